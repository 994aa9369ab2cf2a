// Datasets pages: upload with drag & drop, a real progress bar (XHR upload.onprogress) and a
// column-mapping form when the file's keys are not LLaMA-Factory's defaults; the token histogram.
(() => {
  const ALPACA_ROLES = ["prompt", "query", "response", "system", "history"];
  const SHAREGPT_ROLES = ["messages", "system", "tools"];
  // What LLaMA-Factory reads without `columns` (plus the optional keys detected by name).
  const ALPACA_DEFAULTS = { prompt: "instruction", query: "input", response: "output", system: "system", history: "history" };
  const SHAREGPT_DEFAULTS = { messages: "conversations", system: "system", tools: "tools" };

  const form = document.getElementById("upload-form");
  if (form) setUpUpload(form);

  function setUpUpload(form) {
    const zone = document.getElementById("dropzone");
    const input = document.getElementById("upload-file");
    const button = document.getElementById("upload-button");
    const chosen = document.getElementById("upload-chosen");
    const nameInput = document.getElementById("upload-name");
    const formatting = document.getElementById("upload-formatting");
    const mapping = document.getElementById("column-mapping");
    const progress = document.getElementById("upload-progress");
    const bar = progress.querySelector("span");
    const statusText = document.getElementById("upload-status");
    const errorBox = document.getElementById("upload-error");
    const maxBytes = Number(document.getElementById("upload").dataset.maxBytes);
    let file = null;
    let firstKeys = [];

    input.addEventListener("change", () => choose(input.files[0]));
    // The keyboard's way in: Enter or Space on the drop zone, or the "Choose a file…" button.
    const pick = () => input.click();
    document.getElementById("upload-choose").addEventListener("click", pick);
    zone.addEventListener("click", pick);
    zone.addEventListener("keydown", (event) => {
      if (event.key === "Enter" || event.key === " ") { event.preventDefault(); pick(); }
    });
    ["dragenter", "dragover"].forEach((type) => zone.addEventListener(type, (event) => {
      event.preventDefault(); zone.classList.add("dragover");
    }));
    ["dragleave", "drop"].forEach((type) => zone.addEventListener(type, () => zone.classList.remove("dragover")));
    zone.addEventListener("drop", (event) => { event.preventDefault(); choose(event.dataTransfer.files[0]); });
    formatting.addEventListener("change", () => showMapping());

    function showError(message) { errorBox.textContent = message; errorBox.hidden = !message; }

    // As the pages write sizes (app/templating.py's filesize): 812 B, 41.3 KiB, 6.51 MiB.
    function fileSize(bytes) {
      if (bytes < 1024) return `${bytes} B`;
      let size = bytes;
      for (const unit of ["KiB", "MiB", "GiB", "TiB"]) {
        size /= 1024;
        if (size < 1024 || unit === "TiB") return size < 100 ? `${Number(size.toPrecision(3))} ${unit}` : `${Math.round(size).toLocaleString("en")} ${unit}`;
      }
    }

    async function choose(picked) {
      if (!picked) return;
      file = picked;
      showError("");
      chosen.textContent = `${file.name} — ${fileSize(file.size)}`;
      if (file.size > maxBytes) { showError(`The file is over the limit of ${fileSize(maxBytes)}.`); button.disabled = true; return; }
      if (!nameInput.value) nameInput.value = file.name.replace(/\.[^.]*$/, "").replace(/[^A-Za-z0-9_.-]+/g, "_").replace(/^[._-]+/, "").slice(0, 100);
      firstKeys = await sniffKeys(file);
      showMapping();
      button.disabled = false;
    }

    // The keys of the first row, read from the first MiB only (JSON array or JSON Lines).
    async function sniffKeys(picked) {
      if (/\.txt$/i.test(picked.name)) return []; // plain text: one pre-training document per line
      const head = (await picked.slice(0, 1048576).text()).replace(/^\uFEFF/, "").trimStart();
      const text = head.startsWith("[") ? firstObject(head.slice(1)) : head.split("\n", 1)[0];
      try { const row = JSON.parse(text); return row && typeof row === "object" && !Array.isArray(row) ? Object.keys(row) : []; }
      catch { return []; }
    }
    function firstObject(text) {
      let depth = 0, inString = false, escaped = false, start = text.indexOf("{");
      if (start < 0) return "";
      for (let i = start; i < text.length; i++) {
        const c = text[i];
        if (inString) { if (escaped) escaped = false; else if (c === "\\") escaped = true; else if (c === '"') inString = false; continue; }
        if (c === '"') inString = true;
        else if (c === "{") depth++;
        else if (c === "}" && --depth === 0) return text.slice(start, i + 1);
      }
      return "";
    }

    function detected() {
      const chosenFormat = formatting.value;
      if (chosenFormat !== "auto") return chosenFormat;
      if (firstKeys.includes("instruction") || firstKeys.includes("output")) return "alpaca";
      if (firstKeys.includes("conversations") || firstKeys.includes("messages")) return "sharegpt";
      return "alpaca";
    }
    function keysMatchDefaults(format) {
      if (!firstKeys.length) return true; // unreadable head: let the server explain
      const has = (key) => firstKeys.includes(key);
      if (format === "alpaca") {
        // SFT (output), ranking (chosen + rejected), or pre-training text alone
        return (has("instruction") && (has("output") || (has("chosen") && has("rejected")))) || (has("text") && !has("instruction"));
      }
      return firstKeys.includes("conversations") || firstKeys.includes("messages");
    }

    function showMapping() {
      const format = detected();
      const needed = !keysMatchDefaults(format);
      mapping.hidden = !needed;
      if (!needed) return;
      document.getElementById("mapping-keys").textContent = firstKeys.join(", ");
      document.getElementById("mapping-alpaca").hidden = format !== "alpaca";
      document.getElementById("mapping-sharegpt").hidden = format !== "sharegpt";
      const defaults = format === "alpaca" ? ALPACA_DEFAULTS : SHAREGPT_DEFAULTS;
      const container = document.getElementById(format === "alpaca" ? "mapping-alpaca" : "mapping-sharegpt");
      container.querySelectorAll("select").forEach((select) => {
        const role = select.dataset.role;
        const guess = firstKeys.includes(defaults[role]) ? defaults[role] : "";
        select.replaceChildren(new Option("(none)", ""), ...firstKeys.map((key) => new Option(key, key, false, key === guess)));
      });
    }

    function columns() {
      if (mapping.hidden) return null;
      const format = detected();
      const roles = format === "alpaca" ? ALPACA_ROLES : SHAREGPT_ROLES;
      const container = document.getElementById(format === "alpaca" ? "mapping-alpaca" : "mapping-sharegpt");
      const result = {};
      roles.forEach((role) => { result[role] = container.querySelector(`[data-role="${role}"]`).value || null; });
      return result;
    }

    form.addEventListener("submit", (event) => {
      event.preventDefault();
      if (!file) { showError("Choose a file first."); return; }
      const data = new FormData();
      // Fields first: the server reads them before the file streams in.
      data.append("name", nameInput.value.trim());
      data.append("description", document.getElementById("upload-description").value);
      const mapped = columns();
      data.append("kind", document.getElementById("upload-kind").value);
      data.append("formatting", mapped ? detected() : formatting.value);
      if (mapped) data.append("columns", JSON.stringify(mapped));
      data.append("file", file, file.name);

      const xhr = new XMLHttpRequest();
      xhr.open("POST", "/api/v1/datasets");
      const csrf = JSON.parse(document.body.getAttribute("hx-headers") || "{}")["X-CSRF-Token"];
      if (csrf) xhr.setRequestHeader("X-CSRF-Token", csrf);
      xhr.setRequestHeader("Accept", "application/json");
      progress.hidden = false; bar.style.width = "0%"; showError("");
      button.disabled = true; button.setAttribute("aria-busy", "true");
      xhr.upload.onprogress = (e) => {
        if (!e.lengthComputable) return;
        const percent = (100 * e.loaded) / e.total;
        bar.style.width = `${percent.toFixed(1)}%`;
        progress.setAttribute("aria-valuenow", percent.toFixed(0));
        statusText.textContent = percent < 100 ? `${fileSize(e.loaded)} of ${fileSize(e.total)}` : "Checking the last rows…";
      };
      const done = () => { button.disabled = false; button.removeAttribute("aria-busy"); };
      xhr.onload = () => {
        let body = {};
        try { body = JSON.parse(xhr.responseText); } catch { body = { detail: xhr.statusText }; }
        if (xhr.status === 201) { statusText.textContent = `Stored as a ${body.kind} dataset (${body.formatting}).`; window.location.href = `/datasets/${body.id}`; return; }
        done(); progress.hidden = true; statusText.textContent = "";
        const detail = typeof body.detail === "string" ? body.detail : JSON.stringify(body.detail);
        showError(`Not stored (${xhr.status}): ${detail}`);
      };
      xhr.onerror = () => { done(); progress.hidden = true; statusText.textContent = ""; showError("The upload was interrupted (network error); nothing was stored."); };
      xhr.send(data);
    });
  }

  // Token histogram (uPlot bars), drawn whenever the tokens fragment arrives.
  function drawChart(root) {
    const el = root.querySelector?.("#token-chart");
    if (!el || !window.uPlot) return;
    const { edges, counts } = JSON.parse(el.dataset.histogram);
    if (!counts.length) return;
    const cutoff = Number(el.dataset.cutoff);
    const xs = edges.slice(0, -1);
    const width = Math.max(300, el.clientWidth || 600);
    new uPlot({
      width, height: 220,
      scales: { x: { time: false } },
      axes: [{ label: "tokens per row (prompt + response)" }, { label: "rows" }],
      series: [{}, { label: "rows", fill: "rgba(58,91,217,.35)", stroke: "#3a5bd9", paths: uPlot.paths.bars({ size: [0.9], align: 1 }) }],
      hooks: { draw: [(u) => {
        // cutoff_len as a red line
        const x = u.valToPos(cutoff, "x", true);
        if (x < u.bbox.left || x > u.bbox.left + u.bbox.width) return;
        u.ctx.save(); u.ctx.strokeStyle = "#c62828"; u.ctx.lineWidth = 2;
        u.ctx.beginPath(); u.ctx.moveTo(x, u.bbox.top); u.ctx.lineTo(x, u.bbox.top + u.bbox.height); u.ctx.stroke(); u.ctx.restore();
      }] },
    }, [xs, counts], el);
  }
  document.addEventListener("htmx:afterSwap", (event) => drawChart(event.detail.target));

  // The chosen model's suggested template becomes the default template.
  const modelSelect = document.getElementById("tok-model");
  modelSelect?.addEventListener("change", () => {
    const suggested = modelSelect.selectedOptions[0]?.dataset.template;
    if (suggested) document.getElementById("tok-template").value = suggested;
  });
})();
