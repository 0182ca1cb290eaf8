// mend.js: turn a Backtrack stream into the text a person should see. No dependencies; an ES module.
//
// Backtrack may take text back from a live stream: a reset event says how many characters of what the
// client was already shown to erase (`retract_chars`), and, when the policy also wrote a visible notice
// into the text for clients that cannot mend, how many characters of that notice follow (`notice_chars`:
// a client that mends skips them). This module applies both, for OpenAI-style SSE (chat completions and
// completions: a top-level "backtrack" object) and Anthropic SSE (`event: backtrack_reset`).
//
//   import { mend } from "./mend.js";
//   const response = await fetch("/v1/chat/completions", { method: "POST", headers, body });
//   for await (const view of mend(response)) {
//     answer.textContent = view.text;          // the mended text so far (choice 0)
//     if (view.kind === "reset") console.log(view.event, view.retracted);
//   }
//
// Each view is {kind, text, texts, index, ...}: `kind` is "text", "reset" (with `event`, the reset
// object, and `retracted`, the text it erased), "finish" (with `reason`), "error" (with `error`), or
// "debug" (with `debug`: the playground's debug channel, only for requests that carry its token).
// `texts` holds the mended text of every choice by index. Offsets count Unicode code points, as the
// proxy does (a JavaScript string's length counts UTF-16 units).

/** Split `text` where `n` code points from its end begin: [kept, taken]. */
export function splitFromEnd(text, n) {
  let i = text.length;
  for (; n > 0 && i > 0; n--) {
    const low = text.charCodeAt(i - 1);
    const pair = low >= 0xdc00 && low <= 0xdfff && i >= 2 && isHigh(text.charCodeAt(i - 2));
    i -= pair ? 2 : 1;
  }
  return [text.slice(0, i), text.slice(i)];
}

/** Split `text` after its first `n` code points: [taken, rest]. */
export function splitFromStart(text, n) {
  let i = 0;
  for (; n > 0 && i < text.length; n--) {
    const pair = isHigh(text.charCodeAt(i)) && i + 1 < text.length;
    i += pair ? 2 : 1;
  }
  return [text.slice(0, i), text.slice(i)];
}

function isHigh(code) {
  return code >= 0xd800 && code <= 0xdbff;
}

/** The display text of one choice: text appended, reset events applied. */
export class Mender {
  constructor() {
    this.text = "";
    this.events = []; // every reset object applied, in order
    this.skip = 0; // code points of a visible notice still to come (skipped, not shown)
  }

  /** Append a delta; returns what was appended (a notice being skipped is left out). */
  append(delta) {
    if (this.skip > 0) {
      const [notice, rest] = splitFromStart(delta, this.skip);
      this.skip -= Array.from(notice).length;
      delta = rest;
    }
    this.text += delta;
    return delta;
  }

  /** Apply a reset object; returns the text it erased. */
  reset(event) {
    const [kept, retracted] = splitFromEnd(this.text, Number(event.retract_chars) || 0);
    this.text = kept;
    this.skip = Number(event.notice_chars) || 0;
    this.events.push(event);
    return retracted;
  }
}

/** The events of a server-sent event stream: {event, data}, from a `ReadableStream` of bytes. */
export async function* sseEvents(body) {
  const reader = body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  let event = "";
  let data = [];
  try {
    for (;;) {
      const { value, done } = await reader.read();
      buffer += done ? decoder.decode() : decoder.decode(value, { stream: true });
      const lines = buffer.split(/\r\n|\r|\n/);
      // The last piece may be a line still arriving (a lone "\r" too: its "\n" may follow).
      buffer = done ? "" : lines.pop();
      for (const line of lines) {
        if (line === "") {
          if (data.length) yield { event: event || "message", data: data.join("\n") };
          event = "";
          data = [];
        } else if (!line.startsWith(":")) {
          const colon = line.indexOf(":");
          const name = colon < 0 ? line : line.slice(0, colon);
          let value = colon < 0 ? "" : line.slice(colon + 1);
          if (value.startsWith(" ")) value = value.slice(1);
          if (name === "event") event = value;
          else if (name === "data") data.push(value);
        }
      }
      if (done) break;
    }
    if (data.length) yield { event: event || "message", data: data.join("\n") };
  } finally {
    reader.releaseLock();
  }
}

/** Mend a `fetch` response of an OpenAI-style or Anthropic stream; yields views (see the top). */
export async function* mend(response, { dialect = "auto" } = {}) {
  const menders = new Map();
  const mender = (index) => {
    if (!menders.has(index)) menders.set(index, new Mender());
    return menders.get(index);
  };
  const view = (kind, index, more) => {
    const texts = {};
    for (const [i, m] of menders) texts[i] = m.text;
    return { kind, index, text: mender(0).text, texts, ...more };
  };
  for await (const { event, data } of sseEvents(response.body)) {
    if (event === "backtrack_debug") {
      yield view("debug", 0, { debug: JSON.parse(data) });
      continue;
    }
    if (data === "[DONE]") break;
    let message;
    try {
      message = JSON.parse(data);
    } catch {
      yield view("error", 0, { error: { message: `not JSON: ${data.slice(0, 80)}` } });
      break;
    }
    const anthropic = dialect === "anthropic" || (dialect === "auto" && typeof message.type === "string");
    yield* anthropic ? anthropicViews(message, mender, view) : openaiViews(message, mender, view);
  }
}

function* openaiViews(chunk, mender, view) {
  if (chunk.error) {
    yield view("error", 0, { error: chunk.error });
    return;
  }
  const choices = Array.isArray(chunk.choices) ? chunk.choices : [];
  if (chunk.backtrack && chunk.backtrack.event === "reset") {
    const index = choices.length ? choices[0].index ?? 0 : 0;
    const retracted = mender(index).reset(chunk.backtrack);
    yield view("reset", index, { event: chunk.backtrack, retracted });
  }
  for (const choice of choices) {
    const index = choice.index ?? 0;
    const text = choice.delta ? choice.delta.content : choice.text;
    if (typeof text === "string" && text) {
      const appended = mender(index).append(text);
      if (appended) yield view("text", index, { delta: appended });
    }
    if (choice.finish_reason) yield view("finish", index, { reason: choice.finish_reason });
  }
}

function* anthropicViews(message, mender, view) {
  let text = null;
  if (message.type === "content_block_delta" && message.delta && message.delta.type === "text_delta") {
    text = message.delta.text;
  } else if (message.type === "content_block_start" && message.content_block?.type === "text") {
    text = message.content_block.text;
  } else if (message.type === "backtrack_reset") {
    const retracted = mender(0).reset(message);
    yield view("reset", 0, { event: message, retracted });
  } else if (message.type === "message_delta" && message.delta?.stop_reason) {
    yield view("finish", 0, { reason: message.delta.stop_reason });
  } else if (message.type === "error") {
    yield view("error", 0, { error: message.error || {} });
  }
  if (typeof text === "string" && text) {
    const appended = mender(0).append(text);
    if (appended) yield view("text", 0, { delta: appended });
  }
}
