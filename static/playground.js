// Playground: chat with a deployment through the gateway, tokens streamed as they come
// (fetch + ReadableStream over the gateway's server-sent events), optionally next to the base model.
(() => {
  const root = document.getElementById("playground");
  if (!root) return;
  const $ = (id) => document.getElementById(id);
  const gateway = root.dataset.gateway;
  const baseOf = JSON.parse(root.dataset.baseOf || "{}");
  // The conversation: one list of turns, each the user's message and each pane's reply. Both panes
  // are sent the same history: a pane without its own reply to a turn (the comparison was off
  // then) is given the adapter's. Kept per model in localStorage, so a reload loses nothing.
  let turns = [];
  let controllers = [];
  const storageKey = () => `tuneboard.playground.${$("pg-model").value}`;
  function save() { localStorage.setItem(storageKey(), JSON.stringify(turns)); }
  function load() {
    try { turns = JSON.parse(localStorage.getItem(storageKey()) || "[]"); } catch { turns = []; }
  }

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
    render();
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

  function bubble(pane, role, text, note) {
    const el = document.createElement("div");
    el.className = `pg-msg ${role}`;
    el.textContent = text;
    if (note) el.dataset.note = note;
    $(`pg-chat-${pane}`).appendChild(el);
    return el;
  }

  // A reply as its pane shows it: cut off by Stop, failed, or replayed from the adapter's.
  function showReply(el, reply, replayed) {
    el.className = `pg-msg ${reply.error ? "error" : "assistant"}${reply.stopped ? " stopped" : ""}${replayed ? " replayed" : ""}`;
    el.textContent = reply.error ? (reply.text ? `${reply.text}\n\n${reply.error}` : reply.error) : reply.text;
    el.dataset.note = reply.stopped ? "stopped" : replayed ? "the adapter's answer, sent as history" : "";
  }

  function render() {
    $("pg-chat-adapter").replaceChildren();
    $("pg-chat-base").replaceChildren();
    const panes = comparing() ? ["adapter", "base"] : ["adapter"];
    for (const turn of turns) {
      for (const pane of panes) {
        bubble(pane, "user", turn.user);
        const own = turn.replies[pane];
        const reply = own || turn.replies.adapter;
        if (reply) showReply(bubble(pane, "assistant", ""), reply, !own);
      }
    }
  }

  // What a pane sends: the system prompt, then every earlier turn (with the pane's own reply, or
  // the adapter's), then the new message. Failed turns are left out.
  function messagesFor(pane, upto) {
    const messages = [{ role: "system", content: $("pg-system").value }];
    turns.slice(0, upto).forEach((turn) => {
      const reply = turn.replies[pane] || turn.replies.adapter;
      if (!reply || reply.error) return;
      messages.push({ role: "user", content: turn.user }, { role: "assistant", content: reply.text });
    });
    messages.push({ role: "user", content: turns[upto].user });
    return messages;
  }

  function errorMessage(payload, status) {
    return (payload && payload.error && payload.error.message) || (payload && payload.detail) || `HTTP ${status}`;
  }

  // One streamed reply into one pane; resolves with its timing: time to the first token, and the
  // generated tokens (the server's usage count) per second after it.
  async function stream(pane, model, index, controller) {
    const out = bubble(pane, "assistant", "");
    out.setAttribute("aria-busy", "true");
    const reply = { text: "" };
    turns[index].replies[pane] = reply;
    const started = performance.now();
    let first = null, tokens = null, chunks = 0;
    try {
      const response = await fetch(`${gateway}/chat/completions`, {
        method: "POST",
        credentials: "same-origin",
        headers: { "Content-Type": "application/json", "X-CSRF-Token": root.dataset.csrf },
        body: JSON.stringify({
          model, messages: messagesFor(pane, index), stream: true, stream_options: { include_usage: true }, ...params(),
        }),
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
            if (parsed.usage) tokens = parsed.usage.completion_tokens;
            const delta = parsed.choices?.[0]?.delta?.content || "";
            if (delta) {
              first ??= performance.now();
              chunks += 1;
              reply.text += delta;
              out.textContent = reply.text;
            }
          }
        }
        out.parentElement.scrollTop = out.parentElement.scrollHeight;
      }
    } catch (error) {
      if (error.name === "AbortError") reply.stopped = true;
      else reply.error = error.message;
    } finally {
      out.removeAttribute("aria-busy");
      showReply(out, reply, false);
    }
    const ended = performance.now();
    return {
      pane, firstTokenS: first === null ? null : (first - started) / 1000,
      // Without a usage count (an older server), the streamed chunks: one token each on vLLM.
      tokens: tokens ?? chunks, counted: tokens !== null,
      tokensPerS: first !== null && ended > first ? (tokens ?? chunks) / ((ended - first) / 1000) : null,
    };
  }

  function describe(timing) {
    const name = timing.pane === "adapter" ? "" : "base model: ";
    if (timing.firstTokenS === null) return `${name}no token`;
    const speed = timing.tokensPerS === null ? "" : ` · ${timing.counted ? "" : "≈"}${timing.tokensPerS.toFixed(1)} tokens/s`;
    return `${name}first token in ${timing.firstTokenS.toFixed(2)} s${speed} (${timing.tokens} tokens)`;
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
    turns.push({ user: prompt, replies: {} });
    const index = turns.length - 1;
    controllers = panes.map(() => new AbortController());
    const timings = await Promise.all(panes.map(([pane, name], i) => {
      bubble(pane, "user", prompt);
      return stream(pane, name, index, controllers[i]);
    }));
    save();
    $("pg-stats").textContent = timings.map(describe).join(" | ");
    $("pg-send").disabled = false;
    $("pg-stop").disabled = true;
  }

  function clear() {
    turns = [];
    localStorage.removeItem(storageKey());
    render();
  }

  $("pg-form").addEventListener("submit", send);
  $("pg-input").addEventListener("keydown", (e) => { if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) $("pg-form").requestSubmit(); });
  $("pg-stop").addEventListener("click", () => controllers.forEach((c) => c.abort()));
  $("pg-clear").addEventListener("click", clear);
  $("pg-model").addEventListener("change", () => { load(); refreshModel(); });
  $("pg-compare").addEventListener("change", refreshModel);
  root.querySelectorAll("input, textarea#pg-system").forEach((el) => el.addEventListener("input", renderSnippets));
  load();
  refreshModel();
})();
