// The playground page: one request through the proxy, drawn as it streams. The mending is mend.js's;
// this file only draws. Scores and the hold-back come from the debug channel (`event: backtrack_debug`),
// which the proxy sends only to requests carrying the token this page was served with.
import { mend } from "./mend.js";

const config = JSON.parse(document.getElementById("playground-config").textContent);
const $ = (id) => document.getElementById(id);
const SVG = "http://www.w3.org/2000/svg";
const RETRACT_MS = 2500; // how long retracted text stays struck through in the answer before it goes

const ROUTES = {
  openai: {
    path: "/v1/chat/completions",
    body: (prompt) => ({ model: "demo", stream: true, messages: [{ role: "user", content: prompt }] }),
    headers: {},
  },
  anthropic: {
    path: "/v1/messages",
    body: (prompt) => ({ model: "demo", stream: true, max_tokens: 1024, messages: [{ role: "user", content: prompt }] }),
    headers: { "anthropic-version": "2023-06-01" },
  },
};

function setUp() {
  for (const prompt of config.demoPrompts) $("demo").append(new Option(prompt, prompt));
  $("demo").addEventListener("change", () => {
    if ($("demo").value) $("prompt").value = $("demo").value;
  });
  for (const p of config.policies) {
    const label = `${p.name} (threshold ${p.threshold}, hold-back ${p.holdback_tokens})`;
    const option = new Option(label, p.name, p.name === config.defaultPolicy, p.name === config.defaultPolicy);
    option.disabled = !p.selectable;
    if (!p.selectable) option.title = "not in anonymous_allowed_policies";
    $("policy").append(option);
  }
  $("key-field").hidden = !config.tenants;
  $("ask").addEventListener("submit", (e) => {
    e.preventDefault();
    run().catch((err) => status(`failed: ${err.message}`, true));
  });
}

function status(text, error = false) {
  $("status").textContent = text;
  $("status").classList.toggle("error", error);
}

/** One run's drawing state. */
class Run {
  constructor(policy) {
    this.threshold = policy ? policy.threshold : 0.5;
    this.scores = []; // [{until, score}]
    this.unguarded = "";
    this.dropped = null; // what the last resetting verdict dropped, for the reset card that follows
    this.retract = null; // {at, text, timer}: retracted text still shown struck through
    this.text = "";
    this.resets = 0;
  }
}

let current = null;

async function run() {
  const prompt = $("prompt").value.trim();
  if (!prompt) return status("type a prompt or pick one", true);
  const policy = config.policies.find((p) => p.name === $("policy").value);
  const route = ROUTES[$("dialect").value];
  const state = (current = new Run(policy));
  clear();
  drawScores(state);
  const headers = { "Content-Type": "application/json", [config.debugHeader]: config.debugToken, ...route.headers };
  if (policy && policy.name !== config.defaultPolicy) headers["X-Backtrack-Policy"] = policy.name;
  if ($("key").value) headers.Authorization = `Bearer ${$("key").value}`;
  $("send").disabled = true;
  status("streaming…");
  try {
    const response = await fetch(route.path, { method: "POST", headers, body: JSON.stringify(route.body(prompt)) });
    if (!response.ok) {
      const body = await response.text();
      let message = body;
      try {
        const parsed = JSON.parse(body);
        message = (parsed.error && parsed.error.message) || body;
      } catch {
        // not JSON: shown as it came
      }
      return status(`HTTP ${response.status}: ${message}`, true);
    }
    let finish = null;
    for await (const view of mend(response)) {
      if (state !== current) return; // a newer run took over
      if (view.kind === "debug") onDebug(state, view.debug);
      else if (view.kind === "reset") onReset(state, view);
      else if (view.kind === "finish") finish = view.reason;
      else if (view.kind === "error") return status(`stream error: ${view.error.message || "?"}`, true);
      state.text = view.text;
      drawAnswer(state);
    }
    $("holdback").textContent = "";
    status(`done: ${finish || "ended"}; ${state.resets} reset${state.resets === 1 ? "" : "s"}`);
  } finally {
    $("send").disabled = false;
  }
}

function clear() {
  for (const id of ["answer", "holdback", "unguarded"]) $(id).textContent = "";
  $("resets").replaceChildren(Object.assign(document.createElement("li"), { className: "empty", textContent: "none yet" }));
  $("scores").dataset.crossed = "false";
  $("scores").dataset.max = "0";
}

function onDebug(state, debug) {
  if (debug.event === "start") {
    state.threshold = debug.threshold;
    $("score-legend").textContent =
      `policy ${debug.policy}: threshold ${debug.threshold} (dashed), hold-back ${debug.holdback_tokens} tokens, detectors: ${debug.detectors.join(", ")}`;
  } else if (debug.event === "upstream" && debug.index === 0 && debug.attempt === 0) {
    state.unguarded += debug.text; // an unguarded client shows only the first answer, marker and all
    drawUnguarded(state);
  } else if (debug.event === "verdict" && debug.index === 0) {
    state.scores.push({ until: debug.scored_until, score: debug.score });
    $("holdback").textContent = debug.held;
    if (debug.reset) state.dropped = debug.reset.dropped;
    drawScores(state);
  }
}

function onReset(state, view) {
  state.resets += 1;
  finishRetract(state);
  if (view.retracted) {
    const at = view.text.length;
    const del = Object.assign(document.createElement("del"), { className: "retracting", textContent: view.retracted });
    state.retract = { at, del, timer: setTimeout(() => finishRetract(state), RETRACT_MS) };
  }
  const item = document.createElement("li");
  item.dataset.testid = "reset-event";
  const shown = document.createElement("div");
  if (view.retracted) {
    shown.append("retracted from the client's display: ");
    const del = document.createElement("del");
    del.dataset.testid = "retracted";
    del.textContent = view.retracted;
    shown.append(del);
  } else {
    shown.append("nothing the client was shown had to be retracted");
  }
  item.append(shown);
  if (state.dropped) {
    const dropped = document.createElement("div");
    dropped.append("dropped from the hold-back before anyone saw it: ");
    const span = Object.assign(document.createElement("span"), { className: "dropped", textContent: state.dropped });
    dropped.append(span);
    item.append(dropped);
    state.dropped = null;
  }
  const fields = Object.assign(document.createElement("pre"), { className: "fields" });
  fields.textContent = JSON.stringify(view.event);
  item.append(fields);
  const list = $("resets");
  list.querySelector(".empty")?.remove();
  list.append(item);
}

function finishRetract(state) {
  if (!state.retract) return;
  clearTimeout(state.retract.timer);
  state.retract = null;
  if (state === current) drawAnswer(state);
}

function drawAnswer(state) {
  const answer = $("answer");
  if (!state.retract) {
    answer.textContent = state.text;
    return;
  }
  const { at, del } = state.retract; // the same element throughout: it is struck through, then goes
  answer.replaceChildren(state.text.slice(0, at), del, state.text.slice(at));
}

function drawUnguarded(state) {
  const el = $("unguarded");
  const marker = state.unguarded.indexOf("[RESET]");
  if (marker < 0) {
    el.textContent = state.unguarded;
    return;
  }
  const mark = Object.assign(document.createElement("mark"), { textContent: "[RESET]" });
  el.replaceChildren(state.unguarded.slice(0, marker), mark, state.unguarded.slice(marker + 7));
}

function drawScores(state) {
  const strip = $("scores");
  const n = Math.max(state.scores.length, 1);
  const svg = document.createElementNS(SVG, "svg");
  svg.setAttribute("viewBox", `0 0 ${n} 100`);
  svg.setAttribute("preserveAspectRatio", "none");
  svg.setAttribute("role", "img");
  let max = 0;
  state.scores.forEach(({ score, until }, i) => {
    max = Math.max(max, score);
    const bar = document.createElementNS(SVG, "rect");
    const h = Math.max(score * 100, 1.5);
    bar.setAttribute("x", String(i + 0.1));
    bar.setAttribute("width", "0.8");
    bar.setAttribute("y", String(100 - h));
    bar.setAttribute("height", String(h));
    bar.setAttribute("class", score >= state.threshold ? "bar over" : "bar");
    const title = document.createElementNS(SVG, "title");
    title.textContent = `score ${score} up to character ${until}`;
    bar.append(title);
    svg.append(bar);
  });
  const line = document.createElementNS(SVG, "line");
  const y = String(100 - state.threshold * 100);
  for (const [k, v] of [["x1", "0"], ["x2", String(n)], ["y1", y], ["y2", y], ["class", "threshold"]]) line.setAttribute(k, v);
  svg.append(line);
  strip.replaceChildren(svg);
  strip.dataset.max = String(max);
  strip.dataset.crossed = String(max >= state.threshold && state.scores.length > 0);
  svg.setAttribute("aria-label", `${state.scores.length} verdicts, highest score ${max}, threshold ${state.threshold}`);
}

setUp();
