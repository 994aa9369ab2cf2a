// The run dashboard (live charts, progress and log over SSE) and the compare page's overlay.
(function () {
  "use strict";

  const LOG_LINES_KEPT = 500;
  const FINISHED = new Set(["succeeded", "failed", "cancelled", "lost"]);
  const PALETTE = ["#4f6bed", "#e5484d", "#30a46c", "#f76b15", "#8e4ec6", "#0090ff", "#d6409f", "#978365"];

  function chart(el, title, series, { log = false } = {}) {
    const opts = {
      width: Math.max(el.clientWidth, 260), height: 220,
      scales: { x: { time: false }, y: log ? { distr: 3 } : {} },
      axes: [{ label: "step" }, { size: 60, values: (_u, ticks) => ticks.map(number) }],
      series: [{ label: "step" }, ...series.map((s) => ({ spanGaps: true, width: 2, points: { show: false }, ...s }))],
      legend: { live: true },
    };
    const plot = new uPlot(opts, [[], ...series.map(() => [])], el);
    new ResizeObserver(() => plot.setSize({ width: Math.max(el.clientWidth, 260), height: 220 })).observe(el);
    return plot;
  }

  // Learning rates are ~1e-4: plain tick labels would all read "0".
  function number(v) {
    if (v === null) return "";
    const a = Math.abs(v);
    return a !== 0 && (a < 1e-2 || a >= 1e5) ? v.toExponential(1) : String(Number(v.toPrecision(4)));
  }

  function duration(seconds) {
    if (seconds === null || seconds === undefined || seconds === "" || isNaN(seconds)) return "—";
    const s = Math.max(0, Math.round(Number(seconds)));
    const h = Math.floor(s / 3600), m = Math.floor((s % 3600) / 60), r = s % 60;
    return h ? `${h}h ${m}m ${r}s` : m ? `${m}m ${r}s` : `${r}s`;
  }

  function dashboard(data) {
    const runId = data.run.id;
    const points = new Map();
    data.metrics.forEach((m) => points.set(m.step, m));
    const charts = {
      loss: chart(document.getElementById("chart-loss"), "Loss", [
        { label: "train loss", stroke: PALETTE[0] }, { label: "eval loss", stroke: PALETTE[1], points: { show: true } },
      ]),
      lr: chart(document.getElementById("chart-lr"), "Learning rate", [{ label: "lr", stroke: PALETTE[2] }]),
      tps: chart(document.getElementById("chart-tps"), "Tokens/s", [{ label: "tokens/s", stroke: PALETTE[3] }]),
    };

    let redrawPending = false;
    function redraw() {
      if (redrawPending) return;
      redrawPending = true;
      requestAnimationFrame(() => {
        redrawPending = false;
        const rows = [...points.values()].sort((a, b) => a.step - b.step);
        const steps = rows.map((r) => r.step);
        const col = (name) => rows.map((r) => (r[name] === undefined ? null : r[name]));
        charts.loss.setData([steps, col("loss"), col("eval_loss")]);
        charts.lr.setData([steps, col("learning_rate")]);
        charts.tps.setData([steps, col("tokens_per_s")]);
      });
    }

    const log = document.getElementById("run-log");
    const follow = document.getElementById("run-log-follow");
    function appendLogs(lines) {
      if (!lines.length) return;
      const fragment = document.createDocumentFragment();
      lines.forEach((entry) => fragment.appendChild(document.createTextNode(entry.line.replace(/\n?$/, "\n"))));
      log.appendChild(fragment);
      while (log.childNodes.length > LOG_LINES_KEPT) log.removeChild(log.firstChild);
      if (follow.checked) log.scrollTop = log.scrollHeight;
    }
    // Scrolling up to read stops following; scrolling back to the bottom resumes it.
    log.addEventListener("scroll", () => { follow.checked = log.scrollTop + log.clientHeight >= log.scrollHeight - 8; });

    const state = { ...data.run };
    function progress(change) {
      Object.assign(state, change);
      document.getElementById("run-steps").textContent = `${state.current_step}/${state.total_steps || "?"}`;
      document.getElementById("run-progress-bar").style.width = `${state.percentage}%`;
      document.getElementById("run-epoch").textContent = Number(state.epoch).toFixed(2);
      document.getElementById("run-elapsed").textContent = duration(state.elapsed_s);
      document.getElementById("run-remaining").textContent = duration(state.remaining_s);
    }

    function refresh(target) {
      htmx.ajax("GET", `/runs/${runId}`, { target: `#${target}`, swap: "outerHTML" });
    }

    redraw();
    appendLogs(data.logs);
    progress({});

    const source = new EventSource(`/runs/${runId}/events?after=${data.cursor}`);
    source.addEventListener("metric", (event) => {
      const point = JSON.parse(event.data);
      points.set(point.step, point);
      redraw();
    });
    let pendingLogs = [];
    source.addEventListener("log", (event) => {
      pendingLogs.push(JSON.parse(event.data));
      if (pendingLogs.length === 1) requestAnimationFrame(() => { appendLogs(pendingLogs); pendingLogs = []; });
    });
    source.addEventListener("progress", (event) => progress(JSON.parse(event.data)));
    source.addEventListener("status", (event) => {
      const change = JSON.parse(event.data);
      if (change.reset) { points.clear(); redraw(); }
      const badge = document.querySelector("[data-status]");
      if (badge) { badge.textContent = change.status; badge.className = `badge ${change.status}`; }
      refresh("run-header");
      if (FINISHED.has(change.status)) refresh("run-artifacts");
    });
    // The run is over and everything was sent: close instead of letting EventSource reconnect.
    source.addEventListener("end", () => source.close());
  }

  function compare(data) {
    const el = document.getElementById("chart-compare");
    const runs = data.runs;
    const steps = [...new Set(runs.flatMap((run) => (data.series[run.id] || []).map((m) => m.step)))].sort((a, b) => a - b);
    const series = [], columns = [];
    runs.forEach((run, i) => {
      const byStep = new Map((data.series[run.id] || []).map((m) => [m.step, m]));
      const color = PALETTE[i % PALETTE.length];
      series.push({ label: `#${run.id} train`, stroke: color });
      columns.push(steps.map((s) => byStep.get(s)?.loss ?? null));
      series.push({ label: `#${run.id} eval`, stroke: color, dash: [6, 4], points: { show: true } });
      columns.push(steps.map((s) => byStep.get(s)?.eval_loss ?? null));
    });
    chart(el, "Loss", series).setData([steps, ...columns]);
  }

  document.addEventListener("DOMContentLoaded", () => {
    const runData = document.getElementById("run-data");
    if (runData) dashboard(JSON.parse(runData.textContent));
    const compareData = document.getElementById("compare-data");
    if (compareData) compare(JSON.parse(compareData.textContent));
  });
})();
