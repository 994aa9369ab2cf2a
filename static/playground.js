// Playground: chat with a deployment through the gateway, tokens streamed as they come
// (fetch + ReadableStream over the gateway's server-sent events), optionally next to the base model.
(() => {
  const root = document.getElementById("playground");
  if (!root) return;
  const $ = (id) => document.getElementById(id);
  const gateway = root.dataset.gateway;
  const baseOf = JSON.parse(root.dataset.baseOf || "{}");
  const histories = { adapter: [], base: [] };
  let controllers = [];

  function params() {
    return {
      temperature: parseFloat($("pg-temperature").value),
      top_p: parseFloat($("pg-top-p").value),
      max_tokens: parseInt($("pg-max-tokens").value, 10),
      repetition_penalty: parseFloat($("pg-repetition").value),
    };
  }

  function comparing() { return $("pg-compare").checked && !!baseOf[$("pg-model").value]; }

  function refreshModel() {
    const model = $("pg-model").value;
    const base = baseOf[model];
    $("pg-base-name").textContent = base || "not available for this model";
    $("pg-compare").disabled = !base;
    $("pg-adapter-title").textContent = model;
    $("pg-base-pane").hidden = !comparing();
    $("pg-panes").classList.toggle("compare", comparing());
    renderSnippets();
  }

  function renderSnippets() {
    const body = {
      model: $("pg-model").value,
      messages: [{ role: "system", content: $("pg-system").value }, { role: "user", content: "Hello!" }],
      ...params(),
    };
    $("pg-curl").textContent =
      `curl ${gateway}/chat/completions \\\n  -H "Authorization: Bearer $TUNEBOARD_KEY" \\\n` +
      `  -H "Content-Type: application/json" \\\n  -d '${JSON.stringify(body).replaceAll("'", "'\\''")}'`;
    const p = params();
    $("pg-python").textContent =
      `from openai import OpenAI\n\nclient = OpenAI(base_url=${JSON.stringify(gateway)}, api_key="YOUR_KEY")\n` +
      `stream = client.chat.completions.create(\n    model=${JSON.stringify(body.model)},\n` +
      `    messages=[\n        {"role": "system", "content": ${JSON.stringify($("pg-system").value)}},\n` +
      `        {"role": "user", "content": "Hello!"},\n    ],\n` +
      `    temperature=${p.temperature}, top_p=${p.top_p}, max_tokens=${p.max_tokens},\n` +
      `    extra_body={"repetition_penalty": ${p.repetition_penalty}},\n    stream=True,\n)\n` +
      `for chunk in stream:\n    print(chunk.choices[0].delta.content or "", end="", flush=True)\n`;
  }

  function bubble(pane, role, text) {
    const el = document.createElement("div");
    el.className = `pg-msg ${role}`;
    el.textContent = text;
    $(`pg-chat-${pane}`).appendChild(el);
    return el;
  }

  function errorMessage(payload, status) {
    return (payload && payload.error && payload.error.message) || (payload && payload.detail) || `HTTP ${status}`;
  }

  // One streamed completion into one pane; resolves with the number of chunks received.
  async function stream(pane, model, controller) {
    const messages = [{ role: "system", content: $("pg-system").value }, ...histories[pane]];
    const out = bubble(pane, "assistant", "");
    out.setAttribute("aria-busy", "true");
    let text = "", chunks = 0;
    try {
      const response = await fetch(`${gateway}/chat/completions`, {
        method: "POST",
        credentials: "same-origin",
        headers: { "Content-Type": "application/json", "X-CSRF-Token": root.dataset.csrf },
        body: JSON.stringify({ model, messages, stream: true, ...params() }),
        signal: controller.signal,
      });
      if (!response.ok) {
        let payload = null;
        try { payload = await response.json(); } catch (_) { /* not JSON */ }
        throw new Error(errorMessage(payload, response.status));
      }
      const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
      let buffer = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buffer += value;
        let cut;
        while ((cut = buffer.indexOf("\n\n")) >= 0) {
          const event = buffer.slice(0, cut);
          buffer = buffer.slice(cut + 2);
          for (const line of event.split("\n")) {
            if (!line.startsWith("data:")) continue;
            const data = line.slice(5).trim();
            if (data === "[DONE]") continue;
            const parsed = JSON.parse(data);
            if (parsed.error) throw new Error(errorMessage(parsed));
            const delta = parsed.choices?.[0]?.delta?.content || "";
            if (delta) { text += delta; chunks += 1; out.textContent = text; }
          }
        }
        out.parentElement.scrollTop = out.parentElement.scrollHeight;
      }
      histories[pane].push({ role: "assistant", content: text });
    } catch (error) {
      if (error.name === "AbortError") {
        histories[pane].push({ role: "assistant", content: text });
      } else {
        out.className = "pg-msg error";
        out.textContent = text ? `${text}\n\n${error.message}` : error.message;
        histories[pane].pop(); // the user turn that failed is not part of the conversation
      }
    } finally {
      out.removeAttribute("aria-busy");
    }
    return chunks;
  }

  async function send(event) {
    event.preventDefault();
    const prompt = $("pg-input").value.trim();
    if (!prompt) return;
    const model = $("pg-model").value;
    const panes = comparing() ? [["adapter", model], ["base", baseOf[model]]] : [["adapter", model]];
    $("pg-input").value = "";
    $("pg-send").disabled = true;
    $("pg-stop").disabled = false;
    $("pg-stats").textContent = "";
    const started = performance.now();
    controllers = panes.map(() => new AbortController());
    const counts = await Promise.all(panes.map(([pane, name], i) => {
      histories[pane].push({ role: "user", content: prompt });
      bubble(pane, "user", prompt);
      return stream(pane, name, controllers[i]);
    }));
    const seconds = (performance.now() - started) / 1000;
    $("pg-stats").textContent = `${counts.join(" / ")} chunks in ${seconds.toFixed(1)} s`;
    $("pg-send").disabled = false;
    $("pg-stop").disabled = true;
  }

  function clear() {
    histories.adapter = []; histories.base = [];
    $("pg-chat-adapter").replaceChildren(); $("pg-chat-base").replaceChildren();
  }

  $("pg-form").addEventListener("submit", send);
  $("pg-input").addEventListener("keydown", (e) => { if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) $("pg-form").requestSubmit(); });
  $("pg-stop").addEventListener("click", () => controllers.forEach((c) => c.abort()));
  $("pg-clear").addEventListener("click", clear);
  $("pg-model").addEventListener("change", () => { clear(); refreshModel(); });
  $("pg-compare").addEventListener("change", refreshModel);
  root.querySelectorAll("input, textarea#pg-system").forEach((el) => el.addEventListener("input", renderSnippets));
  refreshModel();
})();
