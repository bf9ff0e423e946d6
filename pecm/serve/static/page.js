// The pecm serve search page: plain JS, no framework, nothing loaded from elsewhere. Every string from the
// server goes into the page through textContent / attributes, never parsed as HTML. The token (if the server has
// one) is kept in sessionStorage and sent as "Authorization: Bearer <token>"; a 401 opens the token prompt
// and retries the request that got it.
"use strict";
(function () {
  const TOKEN_KEY = "pecm-serve-token";
  const $ = (id) => document.getElementById(id);
  const ui = {
    index: $("index"), text: $("text"), k: $("k"), file: $("file"), preview: $("preview"),
    status: $("status"), results: $("results"), overlay: $("token-overlay"), tokenInput: $("token-input"),
    tokenMsg: $("token-msg"),
  };
  const st = { last: null, thumbs: [], pending: null, previewUrl: null, seq: 0 };

  class AuthError extends Error {}

  function token() {
    try { return sessionStorage.getItem(TOKEN_KEY); } catch (e) { return null; }
  }

  function status(msg, error) {
    ui.status.textContent = msg;
    ui.status.className = error ? "error" : "";
  }

  async function api(method, path, body) {
    const headers = {};
    const t = token();
    if (t) headers.Authorization = "Bearer " + t;
    const init = { method, headers, cache: "no-store" };
    if (body !== undefined) {
      headers["Content-Type"] = "application/json";
      init.body = JSON.stringify(body);
    }
    const r = await fetch(path, init);
    if (r.status === 401) throw new AuthError("401");
    if (!r.ok) {
      let msg = r.status + " " + r.statusText;
      try {
        const j = await r.json();
        if (j && typeof j.error === "string") msg = r.status + ": " + j.error;
      } catch (e) { /* not JSON */ }
      throw new Error(msg);
    }
    return r;
  }

  // Run an action; a 401 opens the token prompt, which retries the action once a token is entered.
  async function guarded(action) {
    try {
      await action();
    } catch (e) {
      if (e instanceof AuthError) {
        askToken(action, token() ? "The server refused this token. Enter its token:" : "This server needs a token:");
      } else {
        status(String((e && e.message) || e), true);
      }
    }
  }

  function askToken(retry, msg) {
    st.pending = retry || null;
    ui.tokenMsg.textContent = msg;
    ui.tokenInput.value = "";
    ui.overlay.hidden = false;
    document.body.dataset.token = "prompt";
    ui.tokenInput.focus();
  }

  $("token-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    const t = ui.tokenInput.value.trim();
    if (!t) return;
    try { sessionStorage.setItem(TOKEN_KEY, t); } catch (e) { /* storage disabled: kept for nothing */ }
    ui.overlay.hidden = true;
    document.body.dataset.token = "set";
    const retry = st.pending || loadIndexes;
    st.pending = null;
    guarded(retry);
  });
  $("token-cancel").addEventListener("click", () => {
    ui.overlay.hidden = true;
    st.pending = null;
    document.body.dataset.token = "cancelled";
    status("A token is needed for this server (button 'token').", true);
  });
  $("token-button").addEventListener("click", () => askToken(loadIndexes, "Enter the server's token:"));

  async function loadIndexes() {
    const j = await (await api("GET", "/indexes")).json();
    const before = ui.index.value;
    ui.index.replaceChildren();
    for (const ix of j.indexes) {
      const o = document.createElement("option");
      o.value = ix.name;
      o.textContent = `${ix.name} (${ix.count} items)`;
      o.title = `K=${ix.K}, D=${ix.D}, ${ix.dtype}`;
      ui.index.append(o);
    }
    if (j.indexes.some((ix) => ix.name === before)) ui.index.value = before;
    document.body.dataset.indexes = String(j.indexes.length);
    status(j.indexes.length ? "Search by report text or by an image." : "The server serves no index.", false);
  }

  function fmt(x) {
    return typeof x === "number" && Number.isFinite(x) ? x.toFixed(4) : "–";
  }

  async function search(query, label) {
    if (!ui.index.value) await loadIndexes();
    const k = Math.max(1, parseInt(ui.k.value, 10) || 10);
    const body = Object.assign({ index: ui.index.value, k: k }, query);
    status("Searching " + label + " …", false);
    const j = await (await api("POST", "/search", body)).json();
    st.last = { query, label };
    render(j, label);
  }

  function render(j, label) {
    for (const u of st.thumbs) URL.revokeObjectURL(u);
    st.thumbs = [];
    const tpl = $("card-template");
    const cards = j.results.map((h, rank) => {
      const c = tpl.content.firstElementChild.cloneNode(true);
      const md = h.metadata || {};
      c.dataset.id = String(h.id);
      c.dataset.score = String(h.score);
      c.dataset.sim = String(h.sim);
      c.dataset.conf = String(h.conf);
      c.querySelector(".rank").textContent = "#" + (rank + 1);
      c.querySelector(".hit-id").textContent = "id " + h.id;
      c.querySelector(".modality").textContent = md.modality || "";
      for (const [cls, v] of [["score", h.score], ["sim", h.sim], ["conf", h.conf]]) {
        const dd = c.querySelector("dd." + cls);
        dd.textContent = fmt(v);
        dd.title = String(v);
      }
      const media = c.querySelector(".media");
      if (md.source && md.modality !== "text") {
        const img = document.createElement("img");
        img.alt = "item " + h.id;
        media.append(img);
        thumb(img, media, j.index, h.id);
        c.querySelector(".source").textContent = String(md.source).split(/[\\/]/).pop();
      } else {
        const p = document.createElement("p");
        p.className = "report";
        p.textContent = typeof md.text === "string" ? md.text : "(no report text)";
        media.append(p);
      }
      c.querySelector(".more").addEventListener("click", () => guarded(() => search({ id: h.id }, "more like item " + h.id)));
      return c;
    });
    ui.results.replaceChildren(...cards);
    st.seq += 1;
    ui.results.dataset.seq = String(st.seq);
    ui.results.dataset.index = j.index;
    status(`${j.results.length} results in ${j.index} for ${label} (${j.took_ms} ms)`, false);
  }

  // Thumbnails need the Authorization header, which <img src> cannot send: fetch, then a blob: URL.
  async function thumb(img, media, index, id) {
    try {
      const r = await api("GET", `/items/${encodeURIComponent(id)}/image?index=${encodeURIComponent(index)}`);
      const u = URL.createObjectURL(await r.blob());
      st.thumbs.push(u);
      img.src = u;
    } catch (e) {
      const s = document.createElement("span");
      s.className = "missing";
      s.textContent = "image unavailable" + (e instanceof AuthError ? "" : ": " + String((e && e.message) || e));
      img.replaceWith(s);
    }
  }

  function readBase64(file) {
    return new Promise((resolve, reject) => {
      const fr = new FileReader();
      fr.onload = () => resolve(String(fr.result).slice(String(fr.result).indexOf(",") + 1));
      fr.onerror = () => reject(new Error("cannot read " + file.name));
      fr.readAsDataURL(file);
    });
  }

  $("text-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    const text = ui.text.value.trim();
    if (!text) return status("Type a report first.", true);
    const short = text.length > 40 ? text.slice(0, 40) + "…" : text;
    guarded(() => search({ text }, "“" + short + "”"));
  });

  ui.file.addEventListener("change", () => {
    if (st.previewUrl) URL.revokeObjectURL(st.previewUrl);
    const f = ui.file.files[0];
    st.previewUrl = f ? URL.createObjectURL(f) : null;
    ui.preview.hidden = !f;
    if (f) ui.preview.src = st.previewUrl;
  });

  $("image-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    const f = ui.file.files[0];
    if (!f) return status("Choose an image first.", true);
    guarded(async () => search({ image: await readBase64(f) }, "image " + f.name));
  });

  // Switching index re-runs the last text / image query there (item ids belong to one index).
  ui.index.addEventListener("change", () => {
    const last = st.last;
    if (last && last.query.id === undefined) {
      guarded(() => search(last.query, last.label));
    } else {
      ui.results.replaceChildren();
      st.last = null;
      status("Index " + ui.index.value + ".", false);
    }
  });

  guarded(loadIndexes);
})();
