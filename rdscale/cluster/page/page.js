// rdscale search page. Plain JavaScript, no library and nothing fetched from anywhere but this server: it uses
// only the public JSON API (GET info, card, openapi.json; POST search, records, explain), so anything it shows
// can be scripted. State lives in the URL (a permalink); a new search aborts the one in flight.
"use strict";

const $ = (id) => document.getElementById(id);
const SVG = "http://www.w3.org/2000/svg";
const FIELDS = ["q", "table", "width", "mode", "k", "filter", "recall", "release"];
// UniProtKB accession (https://www.uniprot.org/help/accession_numbers), optionally an isoform suffix
const UNIPROT = /^([OPQ][0-9][A-Z0-9]{3}[0-9]|[A-NR-Z][0-9]([A-Z][A-Z0-9]{2}[0-9]){1,2})(-[0-9]+)?$/;
const COLOURS = ["#1f5fbf", "#d1495b", "#2e933c", "#e8a33d", "#7b4fbf", "#00798c", "#b5651d", "#6c757d",
                 "#c2185b", "#558b2f"];

const state = { info: null, card: null, recall: false, controller: null, rows: [], seq: 0, timer: null };

// ---------------------------------------------------------------------------------------------------------------
// API

async function api(path, body, signal) {
  const init = body === undefined ? { signal } :
    { method: "POST", headers: { "content-type": "application/json" }, body: JSON.stringify(body), signal };
  let response;
  try {
    response = await fetch(path, init);
  } catch (err) {
    if (err.name === "AbortError") throw err;
    throw new Error(`the server did not answer (${err.message || err}); is rdscale serve running?`);
  }
  let data = null;
  try {
    data = await response.json();
  } catch (err) {
    if (err.name === "AbortError") throw err;
  }
  if (!response.ok) {
    const text = data && (data.error || data.detail);
    throw new Error(typeof text === "string" ? text : `${response.status} ${response.statusText}`);
  }
  return data;
}

// ---------------------------------------------------------------------------------------------------------------
// what the query box holds

function parseFasta(text) {
  const sequences = {};
  let name = null;
  let n = 0;
  for (const raw of text.split(/\r\n|\r|\n/)) {
    const line = raw.trim();
    if (line.startsWith(">")) {
      n += 1;
      name = line.slice(1).trim().split(/\s+/)[0] || `query${n}`;
      while (name in sequences) name += "_";
      sequences[name] = "";
    } else if (name !== null) {
      sequences[name] += line.replace(/\s+/g, "");
    }
  }
  return sequences;
}

function parseQuery(text) {
  text = text.trim();
  if (!text) return { error: "empty query: type a protein id, paste a sequence or FASTA records, or a vector as JSON" };
  if (text.startsWith("[")) {
    let value;
    try {
      value = JSON.parse(text);
    } catch (err) {
      return { error: `bad JSON vector: ${err.message}` };
    }
    const vectors = Array.isArray(value) && Array.isArray(value[0]) ? value : [value];
    return { kind: "vectors", value: vectors,
             label: `${vectors.length} vector${vectors.length > 1 ? "s" : ""} of ${vectors[0].length} numbers` };
  }
  if (text.startsWith(">")) {
    const sequences = parseFasta(text);
    const n = Object.keys(sequences).length;
    return { kind: "sequences", value: sequences, label: `${n} FASTA record${n > 1 ? "s" : ""}` };
  }
  const tokens = text.split(/[\s,;]+/).filter(Boolean);
  // ids carry digits or separators (B0RED7, P00042, sp|P12345|X, ID:POS); a sequence is letters only
  if (tokens.every((t) => /[0-9_|:.]/.test(t))) {
    return { kind: "ids", value: tokens, label: tokens.length > 1 ? `${tokens.length} protein ids` : "protein id" };
  }
  const sequence = tokens.join("");
  return { kind: "sequences", value: { query: sequence }, label: `sequence of ${sequence.length} residues` };
}

// ---------------------------------------------------------------------------------------------------------------
// form <-> URL <-> request

function formState() {
  const out = {};
  for (const f of FIELDS) out[f] = $(f === "q" ? "query" : f).value.trim();
  if (!state.recall) delete out.recall;
  return out;
}

function setForm(params) {
  for (const f of FIELDS) {
    if (!params.has(f)) continue;
    const el = $(f === "q" ? "query" : f);
    if (f === "table") { el.value = params.get(f); fillWidths(); }
    else el.value = params.get(f);
  }
  showKind();
}

function toURL(s) {
  const params = new URLSearchParams();
  for (const [k, v] of Object.entries(s)) {
    if (v !== "" && v !== undefined && !(k === "table" && v === "proteins") && !(k === "mode" && v === "exact")
        && !(k === "k" && v === "10")) params.set(k, v);
  }
  const qs = params.toString();
  return qs ? `?${qs}` : location.pathname;
}

function buildRequest(s, parsed) {
  const body = { [parsed.kind]: parsed.value };
  if (s.table === "residues-proteins") {
    body.table = "residues";
    body.aggregate = "proteins";
  } else if (s.table === "residues") {
    body.table = "residues";
  }
  if (s.width) body.width = Number(s.width);
  if (s.mode && s.mode !== "exact") body.mode = s.mode;
  if (s.k) body.k = Number(s.k);
  if (s.filter) body.filter = s.filter;
  if (s.release) body.release = s.release;
  if (state.recall && s.recall) body.recall = Number(s.recall);
  return body;
}

// ---------------------------------------------------------------------------------------------------------------
// search

function showError(text) {
  const el = $("error");
  el.textContent = String(text).split("\n")[0];
  el.title = el.textContent;
  el.hidden = false;
}

function busy(on, started) {
  clearInterval(state.timer);
  $("progress").hidden = !on;
  if (on) {
    const tick = () => { $("status").textContent = `Searching… ${((performance.now() - started) / 1000).toFixed(1)} s`; };
    tick();
    state.timer = setInterval(tick, 100);
  }
}

async function runSearch(push) {
  const s = formState();
  const parsed = parseQuery(s.q);
  if (state.controller) state.controller.abort(); // a second search cancels the first
  const seq = ++state.seq;
  document.body.dataset.started = String(seq); // for scripts and tests: which search ran last, and when it ended
  $("error").hidden = true;
  if (parsed.error) {
    busy(false);
    $("status").textContent = "";
    showError(parsed.error);
    document.body.dataset.done = String(seq);
    return;
  }
  const url = toURL(s);
  if (push && url !== location.search && !(url === location.pathname && !location.search)) {
    history.pushState(null, "", url);
  }
  const controller = new AbortController();
  state.controller = controller;
  const body = buildRequest(s, parsed);
  const started = performance.now();
  busy(true, started);
  try {
    const answer = await api("search", body, controller.signal);
    const seconds = (performance.now() - started) / 1000;
    const ids = [...new Set(answer.hits.map((h) => h.id))];
    const byId = {};
    for (let i = 0; i < ids.length; i += 1000) { // in parts: a server may take few queries per request
      const part = { ids: ids.slice(i, i + 1000), ...(body.release ? { release: body.release } : {}) };
      for (const r of (await api("records", part, controller.signal)).records) byId[r.id] = r;
    }
    if (seq !== state.seq) return;
    state.rows = answer.hits.map((h) => ({ ...h, description: (byId[h.id] || {}).description ?? "",
                                            length: (byId[h.id] || {}).length ?? "" }));
    renderHits(answer, body);
    busy(false);
    const n = answer.hits.length;
    $("status").textContent = `${n} hit${n === 1 ? "" : "s"} for ${answer.queries} quer${answer.queries === 1 ? "y" : "ies"} in ${seconds.toFixed(3)} s`;
    await renderExplain(parsed, body, answer, controller.signal, seq);
  } catch (err) {
    if (err.name === "AbortError" || seq !== state.seq) return; // superseded by a newer search
    busy(false);
    $("status").textContent = "";
    showError(err.message);
  } finally {
    if (seq === state.seq) {
      busy(false);
      state.controller = null;
      document.body.dataset.done = String(seq);
    }
  }
}

// ---------------------------------------------------------------------------------------------------------------
// results

function accession(id) {
  const parts = String(id).split("|");
  const acc = parts.length >= 3 ? parts[1] : parts[0];
  return UNIPROT.test(acc) ? acc : null;
}

function cell(tr, text, cls) {
  const td = document.createElement("td");
  if (cls) td.className = cls;
  if (text instanceof Node) td.appendChild(text); else td.textContent = text;
  tr.appendChild(td);
  return td;
}

function renderHits(answer, body) {
  const residues = body.table === "residues" && !body.aggregate;
  const aggregated = Boolean(body.aggregate);
  const manyQueries = answer.queries > 1 || residues;
  const columns = [...(manyQueries ? ["query"] : []), "rank", "id", "description", "length",
                   ...(residues ? ["position"] : []), "distance", ...(aggregated ? ["residue hits"] : [])];
  const head = $("hits").tHead;
  head.innerHTML = "";
  const hr = head.insertRow();
  for (const c of columns) {
    const th = document.createElement("th");
    th.textContent = c;
    hr.appendChild(th);
  }
  const tbody = $("hits").tBodies[0];
  tbody.innerHTML = "";
  const max = Math.max(1e-9, ...state.rows.map((r) => r.score));
  let last = null;
  for (const r of state.rows) {
    const tr = tbody.insertRow();
    tr.dataset.query = r.query;
    tr.dataset.id = r.id;
    tr.dataset.rank = r.rank;
    tr.dataset.score = r.score;
    if (r.pos !== undefined) tr.dataset.pos = r.pos;
    if (r.hits !== undefined) tr.dataset.hits = r.hits;
    if (manyQueries && last !== null && String(r.query) !== last) tr.className = "first-of-query";
    last = String(r.query);
    if (manyQueries) cell(tr, String(r.query));
    cell(tr, String(r.rank), "num");
    const acc = accession(r.id);
    if (acc) {
      const a = document.createElement("a");
      a.href = `https://www.uniprot.org/uniprotkb/${acc}`;
      a.textContent = r.id;
      a.target = "_blank";
      a.rel = "noopener noreferrer";
      a.title = "UniProtKB entry";
      cell(tr, a);
    } else {
      cell(tr, r.id);
    }
    cell(tr, r.description, "desc");
    cell(tr, String(r.length), "num");
    if (residues) cell(tr, String(r.pos), "num");
    const d = cell(tr, r.score.toFixed(4), "num");
    const bar = document.createElement("span");
    bar.className = "scorebar";
    bar.style.width = `${Math.round(40 * (1 - r.score / max)) + 2}px`;
    d.appendChild(bar);
    if (aggregated) cell(tr, String(r.hits), "num");
  }
  $("hit-count").textContent = `(${state.rows.length})`;
  $("results").hidden = false;
  $("levels-figure").hidden = true;
  $("residues-figure").hidden = true;
}

function download(sep) {
  const columns = ["query", "rank", "id", "description", "length", "pos", "score", "hits"]
    .filter((c) => state.rows.some((r) => r[c] !== undefined && r[c] !== ""));
  const quote = (v) => {
    const s = v === undefined ? "" : String(v);
    if (sep === "\t") return s.replace(/[\t\r\n]/g, " ");
    return /[",\r\n]/.test(s) ? `"${s.replace(/"/g, '""')}"` : s;
  };
  const lines = [columns.join(sep), ...state.rows.map((r) => columns.map((c) => quote(r[c])).join(sep))];
  const blob = new Blob([lines.join("\n") + "\n"], { type: sep === "\t" ? "text/tab-separated-values" : "text/csv" });
  const a = document.createElement("a");
  a.href = URL.createObjectURL(blob);
  a.download = `rdscale-hits.${sep === "\t" ? "tsv" : "csv"}`;
  document.body.appendChild(a);
  a.click();
  setTimeout(() => { URL.revokeObjectURL(a.href); a.remove(); }, 1000);
}

// ---------------------------------------------------------------------------------------------------------------
// pictures (inline SVG)

function el(name, attrs, parent, text) {
  const node = document.createElementNS(SVG, name);
  for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
  if (text !== undefined) node.textContent = text;
  if (parent) parent.appendChild(node);
  return node;
}

function axes(svg, x0, x1, y0, y1, yticks, ymin, ymax, ylabel) {
  for (const t of yticks) {
    const y = y1 - ((t - ymin) / (ymax - ymin || 1)) * (y1 - y0);
    el("line", { x1: x0, x2: x1, y1: y, y2: y, class: "grid" }, svg);
    el("text", { x: x0 - 6, y: y + 4, "text-anchor": "end" }, svg, t.toFixed(2));
  }
  el("line", { x1: x0, x2: x0, y1: y0, y2: y1, class: "axis" }, svg);
  el("line", { x1: x0, x2: x1, y1: y1, y2: y1, class: "axis" }, svg);
  el("text", { x: 12, y: (y0 + y1) / 2, transform: `rotate(-90 12 ${(y0 + y1) / 2})`, "text-anchor": "middle" }, svg, ylabel);
}

function ticks(lo, hi, n) {
  const step = (hi - lo) / n;
  return Array.from({ length: n + 1 }, (_, i) => lo + i * step);
}

function levelsChart(explained) {
  const W = 560, H = 300, x0 = 58, x1 = W - 120, y0 = 14, y1 = H - 40;
  const svg = el("svg", { viewBox: `0 0 ${W} ${H}`, role: "img", "aria-label": "distance at each chain level" });
  const levels = explained.levels;
  const all = explained.targets.flatMap((t) => t.scores);
  let lo = Math.min(...all), hi = Math.max(...all);
  const pad = (hi - lo) * 0.08 || 0.01;
  lo = Math.max(0, lo - pad); hi += pad;
  axes(svg, x0, x1, y0, y1, ticks(lo, hi, 4), lo, hi, "cosine distance");
  const xs = (i) => levels.length === 1 ? (x0 + x1) / 2 : x0 + 10 + (i / (levels.length - 1)) * (x1 - x0 - 20);
  const ys = (v) => y1 - ((v - lo) / (hi - lo)) * (y1 - y0);
  levels.forEach((w, i) => el("text", { x: xs(i), y: y1 + 16, "text-anchor": "middle" }, svg, String(w)));
  el("text", { x: (x0 + x1) / 2, y: H - 6, "text-anchor": "middle" }, svg, "prefix width (chain level)");
  explained.targets.forEach((t, j) => {
    const colour = COLOURS[j % COLOURS.length];
    const pts = t.scores.map((v, i) => `${xs(i).toFixed(1)},${ys(v).toFixed(1)}`).join(" ");
    const line = el("polyline", { points: pts, fill: "none", stroke: colour, "stroke-width": j === 0 ? 2.5 : 1.5 }, svg);
    el("title", {}, line, `${t.id}: ${t.scores.map((v) => v.toFixed(4)).join(" → ")}`);
    t.scores.forEach((v, i) => el("circle", { cx: xs(i), cy: ys(v), r: 2.5, fill: colour }, svg));
  });
  // labels at the right end, nudged apart so they do not overlap
  const ends = explained.targets.map((t, j) => ({ id: t.id, y: ys(t.scores[t.scores.length - 1]), j }))
    .sort((a, b) => a.y - b.y);
  for (let i = 1; i < ends.length; i++) ends[i].y = Math.max(ends[i].y, ends[i - 1].y + 12);
  for (const e of ends) {
    el("text", { x: x1 + 6, y: e.y + 4, fill: COLOURS[e.j % COLOURS.length], style: `fill:${COLOURS[e.j % COLOURS.length]}` },
       svg, `${e.j + 1}. ${e.id}`);
  }
  return svg;
}

function residuesChart(res) {
  const W = 560, H = 300, x0 = 50, x1 = W - 14, y0 = 14, y1 = H - 40;
  const svg = el("svg", { viewBox: `0 0 ${W} ${H}`, role: "img", "aria-label": "per-residue similarity" });
  const v = res.similarity;
  let lo = Math.min(...v), hi = Math.max(...v);
  lo = Math.min(lo, hi - 0.05);
  axes(svg, x0, x1, y0, y1, ticks(lo, hi, 4), lo, hi, "cosine similarity");
  const xs = (i) => x0 + (v.length === 1 ? 0.5 : i / (v.length - 1)) * (x1 - x0);
  const ys = (s) => y1 - ((s - lo) / (hi - lo || 1)) * (y1 - y0);
  const pts = v.map((s, i) => `${xs(i).toFixed(1)},${ys(s).toFixed(1)}`);
  el("polygon", { points: `${x0},${y1} ${pts.join(" ")} ${xs(v.length - 1)},${y1}`, fill: "#cfe0f7" }, svg);
  el("polyline", { points: pts.join(" "), fill: "none", stroke: "#7fa6dc", "stroke-width": 1 }, svg);
  // a 9-residue running mean over it: regions, not single residues, are what a reader looks for
  const half = 4;
  const smooth = v.map((_, i) => {
    const part = v.slice(Math.max(0, i - half), i + half + 1);
    return part.reduce((a, b) => a + b, 0) / part.length;
  });
  el("polyline", { points: smooth.map((s, i) => `${xs(i).toFixed(1)},${ys(s).toFixed(1)}`).join(" "), fill: "none",
                   stroke: COLOURS[1], "stroke-width": 2 }, svg);
  el("text", { x: x1 - 4, y: y0 + 12, "text-anchor": "end", style: `fill:${COLOURS[1]}` }, svg, "9-residue mean");
  const step = Math.max(1, Math.ceil(v.length / 8 / 10) * 10);
  for (let i = 0; i < v.length; i += step) {
    el("text", { x: xs(i), y: y1 + 16, "text-anchor": "middle" }, svg, String(i + 1));
  }
  el("text", { x: (x0 + x1) / 2, y: H - 6, "text-anchor": "middle" }, svg, "query residue");
  v.forEach((s, i) => {
    const hit = el("rect", { x: xs(i) - (x1 - x0) / v.length / 2, y: y0, width: (x1 - x0) / v.length, height: y1 - y0,
                             fill: "transparent" }, svg);
    el("title", {}, hit, `${i + 1} ${res.sequence[i] || ""}: ${s.toFixed(3)} (best match: residue ${res.best_match[i] + 1})`);
  });
  return svg;
}

async function renderExplain(parsed, body, answer, signal, seq) {
  // the hits of the first query, when they are proteins
  if (body.table === "residues" && !body.aggregate) return;
  const first = answer.hits.length ? String(answer.hits[0].query) : null;
  const targets = answer.hits.filter((h) => String(h.query) === first).slice(0, 10).map((h) => h.id);
  if (!targets.length) return;
  let query;
  if (parsed.kind === "ids") {
    if (body.table === "residues" && parsed.value[0].includes(":")) return;
    query = { ids: [parsed.value[0]] };
  } else if (parsed.kind === "sequences") {
    const name = Object.keys(parsed.value)[0];
    query = { sequences: { [name]: parsed.value[name] } };
  } else {
    if (body.table === "residues") return;
    query = { vectors: parsed.value[0] };
  }
  let explained;
  try {
    explained = await api("explain", { ...query, targets, ...(body.release ? { release: body.release } : {}) },
                          signal);
  } catch (err) {
    if (err.name === "AbortError") throw err;
    return; // the picture is a bonus; the table stands without it
  }
  if (seq !== state.seq) return;
  const lc = $("levels-chart");
  lc.replaceChildren(levelsChart(explained));
  $("levels-figure").hidden = false;
  if (explained.residues) {
    $("residues-caption").textContent = `Per-residue similarity of the query to the top hit ${explained.residues.of}: ` +
      `for each query residue, its best cosine similarity to any residue of ${explained.residues.of} (width ${explained.residues.width})`;
    $("residues-chart").replaceChildren(residuesChart(explained.residues));
    $("residues-figure").hidden = false;
  }
}

// ---------------------------------------------------------------------------------------------------------------
// the run: info, card, widths, releases

function tableInfo() {
  if (!state.info) return null;
  const t = $("table").value === "proteins" ? "proteins" : "residues";
  return state.info.tables[t] || null;
}

function fillWidths() {
  const sel = $("width");
  const keep = sel.value;
  sel.innerHTML = "";
  const auto = document.createElement("option");
  auto.value = "";
  auto.textContent = "auto";
  sel.appendChild(auto);
  const t = tableInfo();
  for (const w of (t && t.levels) || []) {
    const o = document.createElement("option");
    o.value = String(w);
    o.textContent = String(w);
    sel.appendChild(o);
  }
  if ([...sel.options].some((o) => o.value === keep)) sel.value = keep;
}

function recallText(r) {
  if (r === undefined || r === null) return "";
  if (typeof r === "number") return `recall ${r.toFixed(3)}`;
  if (typeof r === "object") {
    if (typeof r.recall === "number") return `recall ${r.recall.toFixed(3)}`;
    return `recall ${Object.entries(r).map(([k, v]) => `${k} ${typeof v === "number" ? +v.toFixed(3) : v}`).join(", ")}`;
  }
  return `recall ${r}`;
}

function dd(list, term, content) {
  const dt = document.createElement("dt");
  dt.textContent = term;
  const d = document.createElement("dd");
  if (content instanceof Node) d.appendChild(content); else d.textContent = content;
  list.append(dt, d);
}

function renderCard() {
  const list = $("card-list");
  list.innerHTML = "";
  const info = state.info, card = state.card;
  if (!info) return;
  dd(list, "run", info.run);
  if (card) {
    dd(list, "models", card.models.map((m) => `${m.name} (${m.width})`).join(" → ") || "—");
    dd(list, "levels", card.levels.join(", "));
    const c = card.counts;
    dd(list, "rows", ["proteins", "residues", "rejects"].filter((t) => t in c)
      .map((t) => `${Number(c[t]).toLocaleString("en")} ${t}`).join(", "));
  }
  const ul = document.createElement("ul");
  for (const [t, ti] of Object.entries(info.tables)) {
    for (const ix of ti.indexes || []) {
      const li = document.createElement("li");
      li.textContent = [`${t} @ ${ix.width}`, ix.backend, ix.index_type, ix.metric, recallText(ix.recall)]
        .filter(Boolean).join(" · ");
      li.className = "index";
      ul.appendChild(li);
    }
  }
  dd(list, "indexes", ul.childNodes.length ? ul : "none (exact search only)");
  if (card) {
    if (card.releases.length) {
      const rl = document.createElement("ul");
      for (const r of card.releases) {
        const li = document.createElement("li");
        li.textContent = `${r.name} (v${r.version}${r.current ? ", current" : ""})`;
        const b = document.createElement("button");
        b.type = "button";
        b.className = "release";
        b.textContent = "search";
        b.title = `search release ${r.name} (exact mode)`;
        b.addEventListener("click", () => {
          $("release").value = r.current ? "" : r.name;
          if (!r.current) $("mode").value = "exact";
          $("query").focus();
        });
        li.appendChild(b);
        rl.appendChild(li);
      }
      dd(list, "releases", rl);
    } else {
      dd(list, "releases", "none (never updated)");
    }
    const rel = $("release");
    for (const r of card.releases) {
      if (r.current) continue;
      const o = document.createElement("option");
      o.value = r.name;
      o.textContent = r.name;
      rel.appendChild(o);
    }
  }
}

function showKind() {
  const text = $("query").value;
  const p = text.trim() ? parseQuery(text) : null;
  $("query-kind").textContent = p && !p.error ? `· read as ${p.label}` : "";
}

async function start() {
  $("search-form").addEventListener("submit", (e) => { e.preventDefault(); runSearch(true); });
  $("query").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
      e.preventDefault();
      $("search-form").requestSubmit();
    }
  });
  $("query").addEventListener("input", showKind);
  $("table").addEventListener("change", fillWidths);
  $("dl-csv").addEventListener("click", () => download(","));
  $("dl-tsv").addEventListener("click", () => download("\t"));
  window.addEventListener("popstate", () => { setForm(new URLSearchParams(location.search)); runSearch(false); });
  try {
    const [info, card, schema] = await Promise.all([
      api("info"), api("card").catch(() => null), api("openapi.json").catch(() => null)]);
    state.info = info;
    state.card = card;
    const props = schema && schema.components && schema.components.schemas.SearchRequest &&
      schema.components.schemas.SearchRequest.properties;
    const indexRecall = Object.values(info.tables).some((t) => (t.indexes || []).some((i) => i.recall !== undefined));
    state.recall = Boolean(props && props.recall) || false;
    $("recall-label").hidden = !state.recall;
    if (state.recall && !indexRecall) $("recall").placeholder = "target";
    $("run-name").textContent = `· ${info.run}`;
    document.title = `rdscale search · ${info.run}`;
    if (!info.tables.residues) {
      for (const o of [...$("table").options]) if (o.value !== "proteins") o.remove();
    }
    fillWidths();
    renderCard();
  } catch (err) {
    showError(err.message);
  }
  const params = new URLSearchParams(location.search);
  setForm(params);
  document.body.dataset.ready = "1";
  if (params.get("q")) runSearch(false);
}

start();
