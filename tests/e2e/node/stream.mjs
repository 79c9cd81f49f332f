// One streaming request through the official OpenAI Node SDK (openai-node), iterated with
// `for await`: `node stream.mjs chat|responses`. Prints one JSON line: every event the SDK
// yielded with its arrival time (ms since the request was sent), then what it raised, if anything.
// Driven by tests/e2e/test_openai_node_streaming.py.
import OpenAI from "openai";

const client = new OpenAI({
  baseURL: process.env.PROXY_BASE_URL,
  apiKey: process.env.PROXY_TOKEN,
  maxRetries: 0,
  timeout: 120_000,
});

const api = process.argv[2] ?? "chat";
const started = performance.now();
const since = () => Math.round((performance.now() - started) * 10) / 10;
const events = [];
let lambdaRequestId = null;

function summary(event) {
  if (api === "chat") {
    return { object: event.object, content: event.choices?.[0]?.delta?.content ?? null };
  }
  return { type: event.type, delta: event.delta ?? null, sequence_number: event.sequence_number };
}

try {
  const request = api === "chat"
    ? client.chat.completions.create({
      model: "gpt-4o-mini",
      messages: [{ role: "user", content: "Say hi" }],
      stream: true,
    })
    : client.responses.create({ model: "gpt-4o-mini", input: "Say hi", stream: true });
  const { data: stream, response } = await request.withResponse();
  lambdaRequestId = response.headers.get("x-lambda-request-id");
  for await (const event of stream) {
    events.push({ t: since(), ...summary(event) });
  }
  console.log(JSON.stringify({ ok: true, lambdaRequestId, events, ended: since() }));
} catch (err) {
  console.log(JSON.stringify({
    ok: false,
    lambdaRequestId,
    events,
    ended: since(),
    name: err?.constructor?.name ?? null,
    isApiError: err instanceof OpenAI.APIError,
    status: err?.status ?? null,
    code: err?.code ?? null,
    type: err?.type ?? null,
    message: err?.message ?? String(err),
  }));
}
