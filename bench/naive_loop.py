#!/usr/bin/env python3
"""The baseline for the outage benchmark: the seed document's retry loop, run as a Lambda function.

`call_openai_api_with_retries` is the seed's code (the "Code Examples" of the guide this project grew from) with
only the endpoint and key read from the environment: `requests`, 5 tries, sleeps of 1-2-4-8-16 s
after each failure (the last one included), a 30 s timeout per call, 4xx raised at once, `None`
after the last try, no notion of the invocation's deadline.

Around it: the thinnest handler a user of that snippet would write (API Gateway v2 event in,
`{"statusCode", "body"}` out; `None` becomes a 502) and a minimal custom-runtime loop against
`AWS_LAMBDA_RUNTIME_API` (what the Python runtime interface client does: `next`, call the handler,
post the result, or post an error when the handler raises).
"""

import json
import os
import time
import traceback
import urllib.request

import requests
from requests.exceptions import RequestException

OPENAI_API_KEY = os.environ.get("OPENAI_API_KEY", "YOUR_OPENAI_API_KEY")
OPENAI_ENDPOINT = os.environ.get("OPENAI_BASE_URL", "https://api.openai.com/v1").rstrip("/") + "/chat/completions"


# --- the seed, verbatim apart from the two constants above -----------------------------------
def call_openai_api_with_retries(messages, model="gpt-3.5-turbo", max_retries=5, initial_backoff_seconds=1):
    headers = {
        "Content-Type": "application/json",
        "Authorization": f"Bearer {OPENAI_API_KEY}",
    }
    payload = {
        "model": model,
        "messages": messages,
    }
    retries = 0
    backoff_time = initial_backoff_seconds
    while retries < max_retries:
        try:
            response = requests.post(OPENAI_ENDPOINT, headers=headers, json=payload, timeout=30)
            response.raise_for_status()  # Raises HTTPError for 4xx or 5xx errors
            # If we reach here, the request was successful
            return response.json()
        except requests.exceptions.HTTPError as e:
            if 500 <= e.response.status_code < 600:
                print(f"Server error ({e.response.status_code}) encountered. Retrying in {backoff_time}s...")
                retries += 1
                time.sleep(backoff_time)
                backoff_time *= 2  # Exponential backoff
            else:
                # Other HTTP errors (4xx) are not retried, raise immediately
                print(f"Client error ({e.response.status_code}) occurred: {e.response.text}")
                raise
        except RequestException as e:
            # Catch network errors, timeouts, etc.
            print(f"Network or connection error: {e}. Retrying in {backoff_time}s...")
            retries += 1
            time.sleep(backoff_time)
            backoff_time *= 2
        except Exception as e:
            # Catch any other unexpected errors
            print(f"An unexpected error occurred: {e}")
            raise
    print(f"Failed after {max_retries} retries.")
    return None  # Or raise a custom exception
# --- end of the seed ---------------------------------------------------------------------------


def handler(event, context):
    body = json.loads(event.get("body") or "{}")
    result = call_openai_api_with_retries(body.get("messages", []), model=body.get("model", "gpt-3.5-turbo"))
    if result is None:
        return {"statusCode": 502, "body": json.dumps({"error": "OpenAI API call failed after retries"})}
    return {"statusCode": 200, "headers": {"content-type": "application/json"}, "body": json.dumps(result)}


def main():
    api = "http://" + os.environ["AWS_LAMBDA_RUNTIME_API"] + "/2018-06-01/runtime"
    while True:
        with urllib.request.urlopen(api + "/invocation/next", timeout=None) as r:
            request_id = r.headers["Lambda-Runtime-Aws-Request-Id"]
            event = json.loads(r.read())
        try:
            out = json.dumps(handler(event, None)).encode()
            url = f"{api}/invocation/{request_id}/response"
        except Exception as e:  # what the Python runtime does with an unhandled exception
            traceback.print_exc()
            out = json.dumps({"errorMessage": str(e), "errorType": type(e).__name__}).encode()
            url = f"{api}/invocation/{request_id}/error"
        req = urllib.request.Request(url, data=out, method="POST", headers={"Content-Type": "application/json"})
        urllib.request.urlopen(req).read()


if __name__ == "__main__":
    main()
