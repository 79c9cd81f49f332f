// One chat completion through the official OpenAI Node SDK (openai-node), against the base URL
// and token given in the environment; prints what the SDK returned or raised as one JSON line.
// Driven by tests/e2e/test_openai_node.py.
import OpenAI from "openai";

const client = new OpenAI({
  baseURL: process.env.PROXY_BASE_URL,
  apiKey: process.env.PROXY_TOKEN,
  // The SDK's own retries stay on (its default is 2; 3 here): the function's
  // `x-should-retry: false` must be what stops them.
  maxRetries: 3,
  timeout: 120_000,
});

try {
  const completion = await client.chat.completions.create({
    model: "gpt-4o-mini",
    messages: [{ role: "user", content: "Say hello in five words." }],
  });
  console.log(JSON.stringify({ ok: true, version: OpenAI.VERSION ?? null, completion }));
} catch (err) {
  console.log(JSON.stringify({
    ok: false,
    name: err?.constructor?.name ?? null,
    isApiError: err instanceof OpenAI.APIError,
    isInternalServerError: err instanceof OpenAI.InternalServerError,
    status: err?.status ?? null,
    code: err?.code ?? null,
    type: err?.type ?? null,
    message: err?.message ?? String(err),
    shouldRetry: err?.headers?.get?.("x-should-retry") ?? null,
  }));
}
