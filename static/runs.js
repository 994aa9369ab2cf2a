// The run dashboard (live charts, progress, checkpoints and log over SSE) and the compare page's
// overlay, both with the same chart controls: smoothing, log scale, x-axis.
(function () {
  "use strict";

  const LOG_LINES_KEPT = 500;
  const FINISHED = new Set(["succeeded", "failed", "cancelled", "lost"]);
  const PALETTE = ["#4f6bed", "#e5484d", "#30a46c", "#f76b15", "#8e4ec6", "#0090ff", "#d6409f", "#978365"];
  const SETTINGS_KEY = "tuneboard.chart-settings";
  // A refreshed checkpoint table is asked for at most this often while a checkpoint is due.
  const CHECKPOINT_POLL_MS = 2000;
  // What the x-axis can count: the same step, epoch or token count lines up runs of different lengths.
  const X_AXES = {
    step: { label: "step", of: (p) => p.step },
    epoch: { label: "epoch", of: (p) => p.epoch },
    tokens: { label: "tokens trained on", of: (p) => p.total_tokens },
  };

  // ---------------------------------------------------------------- chart settings
  function loadSettings() {
    try { return { smoothing: 0.6, log: false, x: "step", ...JSON.parse(localStorage.getItem(SETTINGS_KEY) || "{}") }; }
    catch { return { smoothing: 0.6, log: false, x: "step" }; }
  }

  // Wires the controls to `settings` and calls `changed` after each change.
  function bindControls(settings, changed) {
    const smoothing = document.getElementById("chart-smoothing");
    const shown = document.getElementById("chart-smoothing-value");
    const log = document.getElementById("chart-log");
    const x = document.getElementById("chart-x");
    if (!smoothing) return;
    smoothing.value = settings.smoothing; shown.value = Number(settings.smoothing).toFixed(2);
    log.checked = settings.log; x.value = settings.x;
    const save = () => {
      Object.assign(settings, { smoothing: Number(smoothing.value), log: log.checked, x: x.value });
      shown.value = settings.smoothing.toFixed(2);
      localStorage.setItem(SETTINGS_KEY, JSON.stringify(settings));
      changed();
    };
    smoothing.addEventListener("input", save);
    log.addEventListener("change", save);
    x.addEventListener("change", save);
  }

  // TensorBoard's smoothing: an exponential moving average, debiased so that it starts on the data.
  function smooth(values, weight) {
    let last = 0, count = 0;
    return values.map((v) => {
      if (v === null) return null;
      count += 1;
      last = last * weight + (1 - weight) * v;
      return last / (1 - Math.pow(weight, count));
    });
  }

  // Points (in step order) as rows with an x value; a point without one (an eval-only step has no
  // token count) takes the previous point's, so it stays on the chart.
  function withX(points, axis) {
    const rows = [];
    let previous = null;
    for (const point of points) {
      const x = X_AXES[axis].of(point) ?? previous;
      if (x === null || x === undefined) continue;
      rows.push({ x, point });
      previous = x;
    }
    return rows;
  }

  const TRAIN = (color) => ({ stroke: color, width: 2 });
  const RAW = (color) => ({ stroke: color, width: 1, alpha: 0.3 });
  // Eval points stand out from the train curve: big hollow dots, no line.
  const EVAL = (color) => ({ stroke: color, width: 2, paths: () => null, points: { show: true, size: 9, width: 2, fill: "#fff" } });

  // A uPlot chart in `el`; made again (not re-scaled) when the log scale or the x-axis changes.
  // `share`: series with `scale: "share"` go on a 0–1 axis on the right (accuracies beside rewards).
  function makeChart(el, series, { log = false, xLabel = "step", share = false } = {}) {
    const axes = [{ label: xLabel, values: (_u, ticks) => ticks.map(number) }, { size: 60, values: (_u, ticks) => ticks.map(number) }];
    if (share) axes.push({ scale: "share", side: 1, size: 40, grid: { show: false }, values: (_u, ticks) => ticks.map(number) });
    const opts = {
      width: Math.max(el.clientWidth, 260), height: 220,
      scales: { x: { time: false }, y: log ? { distr: 3, log: 10 } : {}, ...(share ? { share: { range: [0, 1] } } : {}) },
      axes,
      series: [{ label: xLabel, value: (_u, v) => number(v) }, ...series.map((s) => ({ spanGaps: true, points: { show: false }, ...s }))],
      legend: { live: true },
    };
    const plot = new uPlot(opts, [[], ...series.map(() => [])], el);
    plot.resizer = new ResizeObserver(() => plot.setSize({ width: Math.max(el.clientWidth, 260), height: 220 }));
    plot.resizer.observe(el);
    return plot;
  }

  function replaceChart(old, el, series, options) {
    if (old) { old.resizer.disconnect(); old.destroy(); }
    return makeChart(el, series, options);
  }

  // Learning rates are ~1e-4: plain tick labels would all read "0".
  function number(v) {
    if (v === null || v === undefined) return "";
    const a = Math.abs(v);
    return a !== 0 && (a < 1e-2 || a >= 1e5) ? v.toExponential(1) : String(Number(v.toPrecision(4)));
  }

  function duration(seconds) {
    if (seconds === null || seconds === undefined || seconds === "" || isNaN(seconds)) return "—";
    const s = Math.max(0, Math.round(Number(seconds)));
    const h = Math.floor(s / 3600), m = Math.floor((s % 3600) / 60), r = s % 60;
    return h ? `${h}h ${m}m ${r}s` : m ? `${m}m ${r}s` : `${r}s`;
  }

  // Elapsed over every attempt, and remaining at the current attempt's own pace (as
  // app/services/run_views.py computes them for the page as it is first served).
  function times(state, timing) {
    if (!timing.reported) return [timing.elapsed_before_s, null];
    const elapsed = timing.elapsed_before_s + Number(state.elapsed_s || 0);
    if (state.status === "succeeded") return [elapsed, 0];
    const done = state.current_step - timing.start_step;
    if (FINISHED.has(state.status) || done <= 0 || !(state.elapsed_s > 0) || !state.total_steps) return [elapsed, null];
    return [elapsed, (Math.max(state.total_steps - state.current_step, 0) * state.elapsed_s) / done];
  }

  function dashboard(data) {
    const runId = data.run.id;
    const settings = loadSettings();
    const points = new Map();
    data.metrics.forEach((m) => points.set(m.step, m));
    let timing = JSON.parse(document.getElementById("run-header").dataset.timing);
    const elements = { loss: "chart-loss", lr: "chart-lr", tps: "chart-tps", rewards: "chart-rewards", accuracy: "chart-accuracy" };
    const charts = {};

    function build() {
      const xLabel = X_AXES[settings.x].label;
      charts.loss = replaceChart(charts.loss, document.getElementById(elements.loss), [
        { label: "train loss (logged)", ...RAW(PALETTE[0]) },
        { label: "train loss", ...TRAIN(PALETTE[0]) },
        { label: "eval loss", ...EVAL(PALETTE[1]) },
      ], { log: settings.log, xLabel });
      charts.lr = replaceChart(charts.lr, document.getElementById(elements.lr), [{ label: "lr", ...TRAIN(PALETTE[2]) }], { xLabel });
      charts.tps = replaceChart(charts.tps, document.getElementById(elements.tps), [{ label: "tokens/s", ...TRAIN(PALETTE[3]) }], { xLabel });
      // The preference stages' curves (smoothed like the loss; their panels stay hidden for other stages).
      charts.rewards = replaceChart(charts.rewards, document.getElementById(elements.rewards), [
        { label: "chosen", ...TRAIN(PALETTE[2]) },
        { label: "rejected", ...TRAIN(PALETTE[1]) },
        { label: "margin", ...TRAIN(PALETTE[0]) },
        { label: "accuracy", scale: "share", ...TRAIN(PALETTE[4]), dash: [6, 4] },
      ], { xLabel, share: true });
      charts.accuracy = replaceChart(charts.accuracy, document.getElementById(elements.accuracy),
        [{ label: "eval accuracy", ...EVAL(PALETTE[4]) }], { xLabel });
      draw();
    }

    let redrawPending = false;
    function redraw() {
      if (redrawPending) return;
      redrawPending = true;
      requestAnimationFrame(() => { redrawPending = false; draw(); });
    }
    function draw() {
      const rows = withX([...points.values()].sort((a, b) => a.step - b.step), settings.x);
      const xs = rows.map((r) => r.x);
      const col = (name) => rows.map((r) => (r.point[name] === undefined ? null : r.point[name]));
      const loss = col("loss");
      charts.loss.setData([xs, loss, smooth(loss, settings.smoothing), col("eval_loss")]);
      charts.lr.setData([xs, col("learning_rate")]);
      const tps = col("tokens_per_s");
      charts.tps.setData([xs, tps]);
      const shown = (name) => rows.some((r) => r.point[name] !== null && r.point[name] !== undefined);
      const rewardsShown = shown("rewards_chosen") || shown("rewards_accuracies");
      document.getElementById("chart-rewards-panel").hidden = !rewardsShown;
      if (rewardsShown) {
        const s = (name) => smooth(col(name), settings.smoothing);
        charts.rewards.setData([xs, s("rewards_chosen"), s("rewards_rejected"), s("rewards_margins"), s("rewards_accuracies")]);
      }
      document.getElementById("chart-accuracy-panel").hidden = !shown("eval_accuracy");
      if (shown("eval_accuracy")) charts.accuracy.setData([xs, col("eval_accuracy")]);
      // Say why a chart is empty instead of leaving it blank.
      document.getElementById("chart-tps-note").hidden = !rows.length || tps.some((v) => v !== null);
    }

    // A live point of the current attempt: after a resume, LLaMA-Factory's throughput divides every
    // token since step 0 by this attempt's time; count this attempt's own tokens only.
    function ownTokens(point) {
      if (!timing.tokens_before || point.tokens_per_s == null || !point.total_tokens) return point;
      const own = Math.max(point.total_tokens - timing.tokens_before, 0) / point.total_tokens;
      return { ...point, tokens_per_s: point.tokens_per_s * own };
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
      // Until a resumed attempt reports, it stands at its checkpoint's step.
      const step = timing.reported ? state.current_step : timing.start_step;
      document.getElementById("run-steps").textContent = `${step}/${state.total_steps || "?"}`;
      document.getElementById("run-progress-bar").style.width = `${state.total_steps ? (100 * step) / state.total_steps : 0}%`;
      document.getElementById("run-epoch").textContent = Number(state.epoch).toFixed(2);
      const [elapsed, remaining] = times(state, timing);
      document.getElementById("run-elapsed").textContent = duration(elapsed);
      document.getElementById("run-remaining").textContent = duration(remaining);
    }

    // `section`: a block of this page served at /runs/{id}/{section}, into #run-{section}.
    function refresh(section) {
      return htmx.ajax("GET", `/runs/${runId}/${section}`, { target: `#run-${section}`, swap: "outerHTML" });
    }
    function refreshHeader() {
      refresh("header").then(() => {
        timing = JSON.parse(document.getElementById("run-header").dataset.timing);
        progress({});
      });
    }

    // A checkpoint is saved right after its step is logged: once a later step is logged, the
    // table is refreshed until the checkpoint is in it (the worker uploads it meanwhile).
    const saveSteps = data.schedule.save_steps;
    let checkpointAskedAt = 0;
    function checkpointDue() {
      if (!saveSteps || state.current_step <= 1) return;
      const due = Math.floor((state.current_step - 1) / saveSteps) * saveSteps;
      const shown = Number(document.getElementById("run-checkpoints")?.dataset.latest || 0);
      if (due > shown && performance.now() - checkpointAskedAt > CHECKPOINT_POLL_MS) {
        checkpointAskedAt = performance.now();
        refresh("artifacts");
      }
    }

    bindControls(settings, build);
    build();
    appendLogs(data.logs);
    progress({});

    const source = new EventSource(`/runs/${runId}/events?after=${data.cursor}`);
    source.addEventListener("metric", (event) => {
      const point = ownTokens(JSON.parse(event.data));
      points.set(point.step, point);
      redraw();
    });
    let pendingLogs = [];
    source.addEventListener("log", (event) => {
      pendingLogs.push(JSON.parse(event.data));
      if (pendingLogs.length === 1) requestAnimationFrame(() => { appendLogs(pendingLogs); pendingLogs = []; });
    });
    source.addEventListener("progress", (event) => {
      timing.reported = true; // this attempt's own numbers from now on
      progress(JSON.parse(event.data));
      checkpointDue();
    });
    source.addEventListener("status", (event) => {
      const change = JSON.parse(event.data);
      if (change.reset) { points.clear(); redraw(); }
      state.status = change.status;
      const badge = document.querySelector("[data-status]");
      if (badge) { badge.textContent = change.status; badge.className = `badge ${change.status}`; }
      refreshHeader(); // actions, the worker it landed on, a new attempt's timing
      if (FINISHED.has(change.status)) refresh("artifacts");
    });
    // The run is over and everything was sent: close instead of letting EventSource reconnect.
    source.addEventListener("end", () => source.close());
  }

  // Every compared run's smoothed train loss (solid) and eval loss (dashed, dotted points) on one x-axis.
  function compare(data) {
    const el = document.getElementById("chart-compare");
    const settings = loadSettings();
    let plot = null;
    function build() {
      const byRun = data.runs.map((run) => new Map(withX(data.series[run.id] || [], settings.x).map((r) => [r.x, r.point])));
      const xs = [...new Set(byRun.flatMap((rows) => [...rows.keys()]))].sort((a, b) => a - b);
      const series = [], columns = [];
      data.runs.forEach((run, i) => {
        const color = PALETTE[i % PALETTE.length];
        series.push({ label: `${run.label} train`, ...TRAIN(color) });
        columns.push(smooth(xs.map((x) => byRun[i].get(x)?.loss ?? null), settings.smoothing));
        series.push({ label: `${run.label} eval`, stroke: color, width: 2, dash: [6, 4], points: { show: true, size: 9, width: 2, fill: "#fff" } });
        columns.push(xs.map((x) => byRun[i].get(x)?.eval_loss ?? null));
      });
      plot = replaceChart(plot, el, series, { log: settings.log, xLabel: X_AXES[settings.x].label });
      plot.setData([xs, ...columns]);
    }
    bindControls(settings, build);
    build();
  }

  document.addEventListener("DOMContentLoaded", () => {
    const runData = document.getElementById("run-data");
    if (runData) dashboard(JSON.parse(runData.textContent));
    const compareData = document.getElementById("compare-data");
    if (compareData) compare(JSON.parse(compareData.textContent));
  });
})();
