// canao demo page: plain JS, no libraries, no build step.
// Talks to the JSON API: GET /api/models, POST /api/qa, POST /api/generate (server-sent events).
"use strict";

const $ = (id) => document.getElementById(id);

// A server started with --api-key answers 401 until the key is sent: ask for it once per tab.
async function api(url, options = {}) {
  for (let attempt = 0; attempt < 2; attempt++) {
    const key = sessionStorage.getItem("canao-api-key");
    const headers = { ...(options.headers || {}), ...(key ? { Authorization: `Bearer ${key}` } : {}) };
    const res = await fetch(url, { ...options, headers });
    if (res.status !== 401 || attempt === 1) return res;
    const given = window.prompt("This canao server needs its API key:");
    if (!given) return res;
    sessionStorage.setItem("canao-api-key", given.trim());
  }
}

const EXAMPLES = [
  {
    title: "Eiffel Tower",
    context: "The Eiffel Tower is a wrought-iron lattice tower on the Champ de Mars in Paris, France. " +
      "It is named after the engineer Gustave Eiffel, whose company designed and built the tower from 1887 to 1889. " +
      "Locally nicknamed \"La dame de fer\" (French for \"Iron Lady\"), it was constructed as the centrepiece of the " +
      "1889 World's Fair. The tower is 330 metres tall, about the same height as an 81-storey building, and was the " +
      "tallest man-made structure in the world until the Chrysler Building in New York City was finished in 1930.",
    questions: ["Who is the tower named after?", "How tall is the tower?", "When was the Chrysler Building finished?"],
  },
  {
    title: "Transformers",
    context: "The transformer is a deep learning architecture introduced in 2017 by researchers at Google in the paper " +
      "\"Attention Is All You Need\". It relies on a mechanism called self-attention and has no recurrent units, so it " +
      "needs less training time than earlier recurrent neural architectures such as long short-term memory. " +
      "BERT, published in 2018, is an encoder-only transformer that is widely used for question answering.",
    questions: ["What mechanism does the transformer rely on?", "When was BERT published?"],
  },
  {
    title: "Amazon",
    context: "The Amazon rainforest covers much of the Amazon basin of South America. This basin encompasses seven " +
      "million square kilometres, of which five and a half million square kilometres are covered by the rainforest. " +
      "The majority of the forest is contained within Brazil, with 60% of the rainforest, followed by Peru with 13%.",
    questions: ["Which country contains most of the forest?", "How much of the rainforest is in Peru?"],
  },
];
const GEN_PROMPT = "Explain in two sentences why small language models are useful on phones.";

const state = { models: { qa: [], lm: [] }, limits: {}, qa: null, lm: null, genAbort: null,
                qaHistory: [], genHistory: [] };
const PALETTE = ["#2f6fed", "#e8590c", "#2b8a3e", "#9c36b5", "#c92a2a", "#1098ad"];

// ---------------------------------------------------------------- helpers

function fmtMs(ms) {
  if (ms == null || !isFinite(ms)) return "–";
  if (ms === 0) return "0 ms";
  return ms >= 1000 ? (ms / 1000).toFixed(2) + " s" : ms >= 10 ? ms.toFixed(0) + " ms" : ms.toFixed(1) + " ms";
}

function setStatus(id, text, isError) {
  const el = $(id);
  el.textContent = text || "";
  el.classList.toggle("error", !!isError);
}

async function errorMessage(res) {
  try {
    const body = await res.json();
    if (body && body.message) return (body.error === "busy" ? "Busy: " : "") + body.message;
  } catch (_) { /* not JSON */ }
  return `request failed (HTTP ${res.status})`;
}

function modelColor(kind, id) {
  const i = state.models[kind].findIndex((m) => m.id === id);
  return PALETTE[(i < 0 ? 0 : i) % PALETTE.length];
}

function describeModel(m) {
  const info = m.info || {};
  const parts = [];
  const add = (label, value) => { if (value != null && value !== "") parts.push([label, String(value)]); };
  add("engine", info.engine || info.format);
  add("precision", info.precision || mainWeightType(info.weight_types));
  if (info.layers != null) add("layers × hidden", `${info.layers} × ${info.hidden}`);
  else if (info.config && info.config.num_layers != null) add("layers × hidden", `${info.config.num_layers} × ${info.config.hidden_size}`);
  const params = info.parameters != null ? info.parameters : info.params;
  if (params != null) add("parameters", (params / 1e6).toFixed(1) + " M");
  add("size", info.size_mb != null ? info.size_mb + " MB" : null);
  return parts;
}

// The quantized type most weight tensors use (GGUF files mix types: norms stay F32).
function mainWeightType(types) {
  if (!types) return null;
  const entries = Object.entries(types).sort((a, b) => b[1] - a[1]);
  const quant = entries.filter(([t]) => !/^F(16|32)$|^BF16$/.test(t));
  const main = (quant.length ? quant : entries)[0][0];
  return entries.length > 1 ? main + " (mixed)" : main;
}

function renderCard(el, m) {
  el.replaceChildren();
  if (!m) { el.textContent = "no model loaded"; return; }
  describeModel(m).forEach(([label, value], i) => {
    if (i) el.append(" · ");
    el.append(label + " ");
    const b = document.createElement("b");
    b.textContent = value;
    el.append(b);
  });
}

function renderSwitch(kind, containerId, cardId, onChange) {
  const box = $(containerId);
  box.replaceChildren();
  state.models[kind].forEach((m, i) => {
    const label = document.createElement("label");
    const input = document.createElement("input");
    input.type = "radio";
    input.name = containerId;
    input.value = m.id;
    input.checked = i === 0;
    input.addEventListener("change", () => { onChange(m); renderCard($(cardId), m); });
    label.append(input, document.createTextNode(m.id));
    label.title = describeModel(m).map(([a, b]) => `${a}: ${b}`).join("\n");
    box.append(label);
  });
  renderCard($(cardId), state.models[kind][0]);
}

// ---------------------------------------------------------------- tabs

function showTab(which) {
  for (const [tab, panel] of [["tab-qa", "panel-qa"], ["tab-gen", "panel-gen"]]) {
    const on = tab === which;
    $(tab).setAttribute("aria-selected", String(on));
    $(panel).hidden = !on;
  }
}

// ---------------------------------------------------------------- question answering

function renderPassage(context, start, end) {
  const box = $("qa-passage");
  box.replaceChildren();
  if (start == null || end == null || end <= start) { box.textContent = context; return; }
  const mark = document.createElement("mark");
  mark.id = "qa-mark";
  mark.textContent = context.slice(start, end);
  box.append(context.slice(0, start), mark, context.slice(end));
  mark.scrollIntoView({ block: "nearest" });
}

function renderTimings(r) {
  $("t-tokenize").textContent = fmtMs(r.tokenize_ms);
  $("t-model").textContent = fmtMs(r.model_ms);
  $("t-decode").textContent = fmtMs(r.decode_ms);
  $("t-total").textContent = fmtMs(r.total_ms);
  $("t-queue").textContent = fmtMs(r.queue_ms);
  $("t-tokens").textContent = `${r.tokens} / ${r.windows}`;
  const bar = $("qa-bar");
  bar.replaceChildren();
  const total = r.tokenize_ms + r.model_ms + r.decode_ms;
  for (const [cls, v, name] of [["tok", r.tokenize_ms, "tokenize"], ["mod", r.model_ms, "model"], ["dec", r.decode_ms, "span decoding"]]) {
    const s = document.createElement("span");
    s.className = cls;
    s.style.width = (100 * v / total).toFixed(2) + "%";
    s.title = `${name}: ${fmtMs(v)}`;
    bar.append(s);
  }
}

async function askOne(modelId, context, question) {
  const res = await api("/api/qa", {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify({ model: modelId, context, question }),
  });
  if (!res.ok) throw new Error(await errorMessage(res));
  return res.json();
}

function qaInputs() {
  const context = $("qa-context").value;
  const question = $("qa-question").value;
  if (!context.trim()) { setStatus("qa-status", "Paste a passage first.", true); return null; }
  if (!question.trim()) { setStatus("qa-status", "Type a question about the passage.", true); return null; }
  return { context, question };
}

async function ask() {
  const input = qaInputs();
  if (!input || !state.qa) return;
  $("qa-ask").disabled = true;
  setStatus("qa-status", `Asking ${state.qa.id}…`);
  try {
    const r = await askOne(state.qa.id, input.context, input.question);
    const answer = $("qa-answer");
    answer.textContent = r.answer || "(no answer found)";
    answer.classList.toggle("empty", !r.answer);
    $("qa-score").textContent = `score ${r.score.toFixed(2)} · ${r.model}`;
    renderPassage(input.context, r.start_char, r.end_char);
    renderTimings(r);
    pushPoint(state.qaHistory, r.total_ms, r.model);
    drawCharts();
    setStatus("qa-status", `Answered by ${r.model} in ${fmtMs(r.total_ms)}.`);
  } catch (e) {
    setStatus("qa-status", e.message, true);
  } finally {
    $("qa-ask").disabled = false;
  }
}

async function compare() {
  const input = qaInputs();
  if (!input) return;
  const table = $("qa-compare-table");
  const body = table.querySelector("tbody");
  body.replaceChildren();
  table.classList.remove("hidden");
  $("qa-compare").disabled = true;
  for (const m of state.models.qa) {
    const tr = document.createElement("tr");
    const cells = [m.id, (m.info || {}).precision || "–", (m.info || {}).size_mb != null ? m.info.size_mb + " MB" : "–", "…", "", ""];
    cells.forEach((text, i) => { const td = document.createElement("td"); td.textContent = text; if (i >= 4) td.className = "num"; tr.append(td); });
    body.append(tr);
    try {
      const r = await askOne(m.id, input.context, input.question);
      tr.children[3].textContent = r.answer || "(none)";
      tr.children[4].textContent = fmtMs(r.model_ms);
      tr.children[5].textContent = fmtMs(r.total_ms);
      pushPoint(state.qaHistory, r.total_ms, r.model);
      drawCharts();
    } catch (e) {
      tr.children[3].textContent = e.message;
    }
  }
  $("qa-compare").disabled = false;
}

function loadExample(ex, question) {
  $("qa-context").value = ex.context;
  $("qa-question").value = question;
  updateCounts();
  renderPassage(ex.context);
}

// ---------------------------------------------------------------- generation

function genSettings() {
  const num = (id) => Number($(id).value);
  return {
    model: state.lm && state.lm.id,
    prompt: $("gen-prompt").value,
    max_new_tokens: Math.round(num("gen-max")),
    temperature: num("gen-temp"),
    top_k: Math.round(num("gen-topk")),
    top_p: num("gen-topp"),
    seed: Math.round(num("gen-seed")),
    chat: $("gen-chat").checked,
    stream: true,
  };
}

function parseEvent(block) {
  let event = "message";
  const data = [];
  for (const line of block.split("\n")) {
    if (line.startsWith("event:")) event = line.slice(6).trim();
    else if (line.startsWith("data:")) data.push(line.slice(5).replace(/^ /, ""));
  }
  return { event, data: data.length ? JSON.parse(data.join("\n")) : null };
}

async function generate() {
  if (!state.lm) return;
  const body = genSettings();
  if (!body.prompt.trim()) { setStatus("gen-status", "Type a prompt first.", true); return; }
  const out = $("gen-output");
  out.replaceChildren();
  const cursor = document.createElement("span");
  cursor.className = "cursor";
  cursor.textContent = " ";
  out.append(cursor);
  for (const id of ["g-ttft", "g-rate", "g-count", "g-prompt", "g-total", "g-stop"]) $(id).textContent = "–";
  $("gen-start").disabled = true;
  $("gen-stop").disabled = false;
  setStatus("gen-status", `Sending to ${body.model}…`);
  const abort = new AbortController();
  state.genAbort = abort;
  const t0 = performance.now();
  let first = null, lastT = null, n = 0;
  try {
    const res = await api("/api/generate", {
      method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body), signal: abort.signal,
    });
    if (!res.ok) throw new Error(await errorMessage(res));
    const reader = res.body.getReader();
    const decoder = new TextDecoder();
    let buf = "";
    let finished = false;
    while (!finished) {
      const { value, done } = await reader.read();
      if (done) break;
      buf += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buf.indexOf("\n\n")) >= 0) {
        const { event, data } = parseEvent(buf.slice(0, cut));
        buf = buf.slice(cut + 2);
        if (event === "start") {
          setStatus("gen-status", data.queued > 0 ? `Queued behind ${data.queued} request(s)…` : "Generating…");
        } else if (event === "token") {
          const now = performance.now();
          if (first === null) { first = now; $("g-ttft").textContent = fmtMs(now - t0); setStatus("gen-status", "Generating…"); }
          else { pushPoint(state.genHistory, data.t_ms - lastT, body.model); }  // the server's clock: no network jitter
          lastT = data.t_ms;
          n += 1;
          const span = document.createElement("span");
          span.className = "tok";
          span.textContent = data.text;
          out.insertBefore(span, cursor);
          out.scrollTop = out.scrollHeight;
          $("g-count").textContent = String(n);
          if (n > 1) $("g-rate").textContent = ((n - 1) / ((now - first) / 1000)).toFixed(1);
          if (n % 4 === 0) drawCharts();
        } else if (event === "done") {
          $("g-ttft").textContent = fmtMs(data.ttft_ms);
          $("g-rate").textContent = data.tokens_per_s.toFixed(1);
          $("g-count").textContent = String(data.generated_tokens);
          $("g-prompt").textContent = data.prompt_tokens == null ? "–" : String(data.prompt_tokens);
          $("g-total").textContent = fmtMs(data.total_ms);
          $("g-stop").textContent = data.stop_reason || "–";
          setStatus("gen-status", `Done: ${data.generated_tokens} tokens from ${data.model}, first after ${fmtMs(data.ttft_ms)}` +
            (data.queue_ms > 1 ? ` (queued ${fmtMs(data.queue_ms)})` : "") + ".");
          out.dataset.done = "1";
          finished = true;
        } else if (event === "error") {
          throw new Error(data.message);
        }
      }
    }
    if (!finished && !abort.signal.aborted) throw new Error("the stream ended early");
  } catch (e) {
    if (abort.signal.aborted) setStatus("gen-status", `Stopped after ${n} tokens.`);
    else setStatus("gen-status", e.message, true);
  } finally {
    cursor.remove();
    drawCharts();
    state.genAbort = null;
    $("gen-start").disabled = false;
    $("gen-stop").disabled = true;
  }
}

// ---------------------------------------------------------------- latency charts (canvas, no library)

const MAX_POINTS = 60;

function pushPoint(history, ms, model) {
  history.push({ ms, model });
  if (history.length > MAX_POINTS) history.splice(0, history.length - MAX_POINTS);
}

function niceStep(max) {
  const raw = max / 4;
  const mag = Math.pow(10, Math.floor(Math.log10(raw)));
  for (const m of [1, 2, 2.5, 5, 10]) if (raw <= m * mag) return m * mag;
  return 10 * mag;
}

function drawChart(canvas, history, kind) {
  const dpr = window.devicePixelRatio || 1;
  const w = canvas.clientWidth || canvas.width, h = canvas.clientHeight || canvas.height;
  if (canvas.width !== Math.round(w * dpr)) { canvas.width = Math.round(w * dpr); canvas.height = Math.round(h * dpr); }
  const ctx = canvas.getContext("2d");
  ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
  ctx.clearRect(0, 0, w, h);
  const left = 44, right = 8, top = 8, bottom = 16;
  ctx.font = "11px system-ui, sans-serif";
  ctx.fillStyle = "#667085";
  if (!history.length) {
    ctx.fillText("no requests yet", left, h / 2);
    return;
  }
  const ymax = Math.max(1, 1.1 * Math.max(...history.map((p) => p.ms)));
  const step = niceStep(ymax);
  const top_ = Math.ceil(ymax / step) * step;
  const y = (v) => top + (h - top - bottom) * (1 - Math.min(v, top_) / top_);
  const x = (i) => left + (w - left - right) * (history.length === 1 ? 0.5 : i / (MAX_POINTS - 1));
  ctx.strokeStyle = "#e4e7ec";
  ctx.lineWidth = 1;
  ctx.textAlign = "right";
  ctx.textBaseline = "middle";
  for (let v = 0; v <= top_ + 1e-9; v += step) {
    ctx.beginPath(); ctx.moveTo(left, y(v)); ctx.lineTo(w - right, y(v)); ctx.stroke();
    ctx.fillText(fmtMs(v).replace(" ", ""), left - 4, y(v));
  }
  ctx.lineWidth = 1.5;
  for (let i = 1; i < history.length; i++) {
    ctx.strokeStyle = modelColor(kind, history[i].model);
    ctx.beginPath(); ctx.moveTo(x(i - 1), y(history[i - 1].ms)); ctx.lineTo(x(i), y(history[i].ms)); ctx.stroke();
  }
  history.forEach((p, i) => {
    ctx.fillStyle = modelColor(kind, p.model);
    ctx.beginPath(); ctx.arc(x(i), y(p.ms), 2.5, 0, Math.PI * 2); ctx.fill();
  });
  // legend: one swatch per model that appears
  const seen = [...new Set(history.map((p) => p.model))];
  ctx.textAlign = "left";
  ctx.textBaseline = "top";
  let lx = left + 4;
  for (const m of seen) {
    ctx.fillStyle = modelColor(kind, m);
    ctx.fillRect(lx, top, 8, 8);
    ctx.fillStyle = "#1d2330";
    ctx.fillText(m, lx + 11, top - 1);
    lx += ctx.measureText(m).width + 24;
  }
}

function median(history) {
  if (!history.length) return null;
  const s = history.map((p) => p.ms).sort((a, b) => a - b);
  return s[Math.floor(s.length / 2)];
}

function drawCharts() {
  drawChart($("chart-qa"), state.qaHistory, "qa");
  drawChart($("chart-gen"), state.genHistory, "lm");
  const q = state.qaHistory, g = state.genHistory;
  $("c-qa-last").textContent = q.length ? `last ${fmtMs(q[q.length - 1].ms)} · median ${fmtMs(median(q))}` : "";
  $("c-gen-last").textContent = g.length ? `last ${fmtMs(g[g.length - 1].ms)} · median ${fmtMs(median(g))}` : "";
}

// ---------------------------------------------------------------- start-up

function updateCounts() {
  const lim = state.limits;
  $("qa-context-count").textContent = `${$("qa-context").value.length} / ${lim.max_context_chars || "?"} characters`;
  $("gen-prompt-count").textContent = `${$("gen-prompt").value.length} / ${lim.max_prompt_chars || "?"} characters`;
}

async function init() {
  $("tab-qa").addEventListener("click", () => showTab("tab-qa"));
  $("tab-gen").addEventListener("click", () => showTab("tab-gen"));
  $("qa-ask").addEventListener("click", ask);
  $("qa-question").addEventListener("keydown", (e) => { if (e.key === "Enter") ask(); });
  $("qa-compare").addEventListener("click", compare);
  $("qa-context").addEventListener("input", () => { updateCounts(); renderPassage($("qa-context").value); });
  $("gen-prompt").addEventListener("input", updateCounts);
  $("gen-start").addEventListener("click", generate);
  $("gen-stop").addEventListener("click", () => state.genAbort && state.genAbort.abort());
  $("gen-prompt").addEventListener("keydown", (e) => { if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) generate(); });
  window.addEventListener("resize", drawCharts);

  const examples = $("qa-examples");
  for (const ex of EXAMPLES) {
    for (const q of ex.questions.slice(0, 1)) {
      const b = document.createElement("button");
      b.type = "button";
      b.textContent = ex.title;
      b.title = q;
      b.addEventListener("click", () => loadExample(ex, q));
      examples.append(b, " ");
    }
  }
  loadExample(EXAMPLES[0], EXAMPLES[0].questions[0]);
  $("gen-prompt").value = GEN_PROMPT;

  try {
    const res = await api("/api/models");
    if (!res.ok) throw new Error(await errorMessage(res));
    const data = await res.json();
    state.models = { qa: data.qa, lm: data.lm };
    state.limits = data.limits;
    state.qa = data.qa[0] || null;
    state.lm = data.lm[0] || null;
    renderSwitch("qa", "qa-models", "qa-model-card", (m) => { state.qa = m; });
    renderSwitch("lm", "gen-models", "gen-model-card", (m) => { state.lm = m; });
    $("qa-compare").classList.toggle("hidden", data.qa.length < 2);
    $("gen-max").max = String(data.limits.max_new_tokens);
    $("qa-ask").disabled = !state.qa;
    $("gen-start").disabled = !state.lm;
    if (!state.qa) setStatus("qa-status", "This server has no QA model loaded (start it with --qa-model).", true);
    if (!state.lm) setStatus("gen-status", "This server has no generation model loaded (start it with --lm-model).", true);
    $("limits").textContent = `limits: passage ${data.limits.max_context_chars} chars, prompt ${data.limits.max_prompt_chars} chars, ` +
      `${data.limits.max_new_tokens} new tokens, queue ${data.limits.max_queue} per model`;
    updateCounts();
    if (location.hash === "#generate") showTab("tab-gen");
    document.body.dataset.ready = "1";
  } catch (e) {
    setStatus("qa-status", "Could not reach the server: " + e.message, true);
  }
  drawCharts();
}

document.addEventListener("DOMContentLoaded", init);
