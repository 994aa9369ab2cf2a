"""The whole loop in a real browser: Debian's Chromium driven by Playwright against
`tuneboard up --demo`, started as a user starts it (a subprocess in a fresh working dir).

set up the admin → log out / log in → upload an Alpaca file by keyboard alone (skip link, the
drop zone and the file picker with Enter and Space; a progress bar) → preview and token histogram
→ a config from the form (Enter in a field saves nothing, no dataset needs an explicit warning,
an inline error first) → start a run → the loss and tokens/s charts gain points without a reload,
the checkpoint table and the worker fill in live → succeeded → run again, cancel it from the
dashboard, resume it: elapsed and remaining time carry across the attempts and the result plots
are the resumed attempt's → deploy the first run's adapter on vLLM → a streamed reply in the
playground (time to first token, tokens/s), still there after a reload → undeploy → evaluate the
first run with both backends from its page → merge its best checkpoint → serve the merged model →
chat with it. On the way: a
screenshot of each page into docs/screenshots/, times in the browser's locale, empty states,
links between a run, its config, datasets and deployments, the run dashboard at phone width
without horizontal overflow, and no request that answers 404 (the favicon).

The machine may be shared and slow: waits are generous `expect` timeouts, never sleeps.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from playwright.sync_api import Page, expect
from playwright.sync_api import TimeoutError as PlaywrightTimeout

from app.templating import duration
from tests.conftest import ADMIN_PASSWORD, ADMIN_USERNAME, PROJECT_ROOT
from tests.live import chromium_page, free_port

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]

# The README's screenshots: `TUNEBOARD_SCREENSHOTS=docs/screenshots pytest tests/test_browser.py`
# refreshes them; otherwise they go to a temporary folder, so a test run leaves the tree clean.
SCREENSHOTS = Path(os.environ.get("TUNEBOARD_SCREENSHOTS") or tempfile.mkdtemp(prefix="tuneboard-screenshots-"))
DESKTOP = {"width": 1280, "height": 800}
PHONE = {"width": 390, "height": 844}

# Generous: the demo model is built at start-up, and training, vLLM's start and the first
# tokenizer call are slow on a shared 2-core machine.
START_TIMEOUT_S = 600
TRAIN_TIMEOUT_MS = 10 * 60_000
SERVE_TIMEOUT_MS = 10 * 60_000
PAGE_TIMEOUT_MS = 120_000

# The uploaded dataset and the config: 108 training rows (val_size 0.1), batch 8, 2 epochs = 28
# steps, a checkpoint every 5. Seconds on an idle CPU; minutes on a busy shared one.
ROWS = 120
SAVE_STEPS = 5
# Held-out rows an evaluation scores (of the 12 the run held out): few, for a short test.
EVAL_ROWS = 4

# Every uPlot chart a page makes, so the test can count the points it draws. uPlot's bundle
# declares `var uPlot`, which assigns through this setter.
RECORD_CHARTS = """
(() => {
  let real;
  Object.defineProperty(window, "uPlot", {
    configurable: true,
    get() { return real; },
    set(value) {
      real = new Proxy(value, { construct(target, args) {
        const plot = Reflect.construct(target, args);
        (window.__charts = window.__charts || []).push(plot);
        return plot;
      } });
    },
  });
})();
"""
# The dashboard's charts are made again when their options change: the live one is the newest
# chart inside the element. Points: its first series' non-null values (train loss, tokens/s).
def live_chart(element_id: str) -> str:
    return f"(window.__charts || []).filter((c) => c.root.isConnected && c.root.closest('#{element_id}')).at(-1)"


def chart_points(element_id: str) -> str:
    return f"() => (({live_chart(element_id)})?.data?.[1] || []).filter((v) => v !== null).length"


LOSS_POINTS = chart_points("chart-loss")
TOKENS_POINTS = chart_points("chart-tps")


@dataclass
class Panel:
    url: str
    workdir: Path
    process: subprocess.Popen

    def log(self, chars: int = 8000) -> str:
        return (self.workdir / "tuneboard-up.log").read_text(errors="replace")[-chars:]


@pytest.fixture
def panel(tmp_path: Path) -> Iterator[Panel]:
    """`tuneboard up --demo --port N` in a fresh working dir; stopped like Ctrl-C at the end."""
    port = free_port()
    env = {key: value for key, value in os.environ.items() if not key.startswith("TUNEBOARD_")}
    env.update({
        "TUNEBOARD_DATA_DIR": str(tmp_path / "data"),
        "TUNEBOARD_MODEL_ROOTS": json.dumps([str(tmp_path / "models")]),
        "TUNEBOARD_WORKER_GPUS": "none",  # CPU runs, even where the test machine has a GPU
    })
    log_file = (tmp_path / "tuneboard-up.log").open("wb")
    process = subprocess.Popen(
        [str(PROJECT_ROOT / ".venv" / "bin" / "tuneboard"), "up", "--demo", "--port", str(port)],
        cwd=tmp_path, env=env, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True,
    )
    panel = Panel(f"http://127.0.0.1:{port}", tmp_path, process)
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not _healthy(panel.url):
            assert process.poll() is None, f"tuneboard up exited:\n{panel.log()}"
            assert time.monotonic() < deadline, f"not up after {START_TIMEOUT_S} s:\n{panel.log()}"
            time.sleep(0.5)
        yield panel
    finally:
        process.send_signal(signal.SIGINT)  # Ctrl-C: it stops the web app, the worker and their children
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        log_file.close()


def _healthy(url: str) -> bool:
    try:
        return httpx.get(f"{url}/healthz", timeout=5).status_code == 200
    except httpx.TransportError:
        return False


@pytest.fixture
def browser_page() -> Iterator[Page]:
    # A locale and time zone unlike the server's (UTC), so localised times are visible.
    with chromium_page(viewport=DESKTOP, locale="de-DE", timezone_id="Europe/Berlin",
                       init_script=RECORD_CHARTS) as page:
        page.context.set_default_timeout(PAGE_TIMEOUT_MS)
        page.on("dialog", lambda dialog: dialog.accept())  # hx-confirm
        yield page


def test_whole_loop_in_a_browser(panel: Panel, browser_page: Page, tmp_path: Path) -> None:
    page, url = browser_page, panel.url
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    not_found: list[str] = []
    page.context.on("response", lambda response: response.status == 404 and not_found.append(response.url))
    script_errors: list[str] = []
    page.context.on("weberror", lambda error: script_errors.append(str(error.error)))

    set_up_and_log_in(page, url)
    check_empty_states(page, url)
    dataset_id = upload_dataset(page, url, tmp_path)
    check_dataset_detail(page)
    config_id = create_config(page, url, dataset_id)
    run_id = start_run(page)
    watch_run_live(page)
    check_phone_width(page, url, run_id)
    expect_status(page, "succeeded", TRAIN_TIMEOUT_MS)
    check_run_links(page, config_id, dataset_id)
    cancel_and_resume_second_run(page, run_id)
    screenshot_runs_list(page, url)
    deployment_id = deploy(page, url, run_id)
    chat_in_playground(page)
    undeploy(page, url, deployment_id)
    evaluate_both_backends(page, url, run_id)
    merged_model = merge_the_best_checkpoint(page, url)
    serve_merged_and_chat(page, url, merged_model)
    screenshot_workers(page, url)
    assert not_found == [], not_found  # every page's favicon and assets are there
    assert script_errors == [], script_errors


# --------------------------------------------------------------------------- steps
def set_up_and_log_in(page: Page, url: str) -> None:
    """The first visit asks for the admin account; then log out and log back in."""
    page.goto(url + "/")
    expect(page).to_have_url(re.compile(r"/setup$"))
    page.fill("#username", ADMIN_USERNAME)
    page.fill("#password", ADMIN_PASSWORD)
    page.fill("#password_again", "something else")
    page.click("button[type=submit]")
    expect(page.locator(".field-error")).to_contain_text("differ")  # inline, next to the field
    page.fill("#password", ADMIN_PASSWORD)
    page.fill("#password_again", ADMIN_PASSWORD)
    page.click("button[type=submit]")
    expect(page.locator(".usernav")).to_contain_text(ADMIN_USERNAME)

    page.click(".usernav button")  # Log out
    expect(page).to_have_url(re.compile(r"/login"))
    page.fill("#username", ADMIN_USERNAME)
    page.fill("#password", "wrong password")
    page.click("button[type=submit]")
    expect(page.locator(".alert.error")).to_contain_text("Wrong username or password")
    page.fill("#password", "")
    shoot(page, "login")
    page.fill("#password", ADMIN_PASSWORD)
    page.click("button[type=submit]")
    expect(page.locator(".usernav")).to_contain_text(ADMIN_USERNAME)


def check_empty_states(page: Page, url: str) -> None:
    """Before any run: each empty page says what to do next, with a link to where to do it."""
    page.goto(url + "/runs")
    expect(page.locator("#run-table .empty")).to_contain_text("start one")
    page.goto(url + "/deployments")
    expect(page.locator("#deploy-form .empty")).to_contain_text("Train a run")
    expect(page.locator("#deploy-form .empty a[href='/runs']")).to_be_visible()
    expect(page.locator("#deployments-table .empty")).to_contain_text("Deploy a run")
    page.goto(url + "/playground")
    expect(page.locator(".empty")).to_contain_text("Deploy an adapter")
    expect(page.locator(".empty a[href='/deployments']")).to_be_visible()


def upload_dataset(page: Page, url: str, tmp_path: Path) -> int:
    """The file picker, a progress bar while it uploads, then the dataset's page."""
    rows = [
        {"instruction": f"Spell the number {n} in words.", "input": "", "output": _spell(n)}
        for n in range(ROWS)
    ]
    upload = tmp_path / "numbers_alpaca.json"
    upload.write_text(json.dumps(rows, indent=1), encoding="utf-8")

    # File choosers are intercepted from now on (a listener added only when a key opens one can come
    # too late for it, and the chooser then shows nowhere).
    page.on("filechooser", lambda _chooser: None)
    page.goto(url + "/datasets")
    expect(page.get_by_role("link", name="demo-alpaca")).to_be_visible()  # registered by --demo
    check_times_localised(page)
    shoot(page, "datasets")
    # Record what the upload form shows while the request is in flight (the page then navigates).
    page.evaluate("""() => {
      const progress = document.getElementById("upload-progress"), button = document.getElementById("upload-button");
      const seen = { progressShown: false, maxWidth: 0, buttonDisabledInFlight: false };
      new MutationObserver(() => {
        if (!progress.hidden) {
          seen.progressShown = true;
          seen.maxWidth = Math.max(seen.maxWidth, parseFloat(progress.querySelector("span").style.width) || 0);
          seen.buttonDisabledInFlight ||= button.disabled;
        }
        sessionStorage.setItem("upload-seen", JSON.stringify(seen));
      }).observe(document.getElementById("upload"), { attributes: true, subtree: true });
    }""")
    # By keyboard alone: the skip link is the first Tab stop and lands on the drop zone, where Enter
    # opens the file picker.
    page.keyboard.press("Tab")
    expect(page.locator(".skip-link")).to_be_focused()
    expect(page.locator(".skip-link")).to_have_text("Skip to the dataset upload")
    page.keyboard.press("Enter")
    expect(page.locator("#dropzone")).to_be_focused()
    with page.expect_file_chooser() as chooser:
        page.keyboard.press("Enter")
    chooser.value.set_files(str(upload))
    expect(page.locator("#upload-name")).to_have_value("numbers_alpaca")
    expect(page.locator("#upload-chosen")).to_contain_text(re.compile(r"numbers_alpaca\.json — [\d.]+ KiB"))
    # Space on the drop zone, and Tab on to "Choose a file…" with Space or Enter, open the picker too
    # (counted at the file input: Chromium shows one file chooser at a time, the one above was it).
    page.evaluate("() => { window.__pickerOpened = 0; document.getElementById('upload-file')"
                  ".addEventListener('click', () => { window.__pickerOpened += 1; }); }")
    page.keyboard.press("Space")
    page.wait_for_function("() => window.__pickerOpened === 1")
    page.keyboard.press("Tab")
    expect(page.locator("#upload-choose")).to_be_focused()
    page.keyboard.press("Space")
    page.wait_for_function("() => window.__pickerOpened === 2")
    page.keyboard.press("Enter")
    page.wait_for_function("() => window.__pickerOpened === 3")
    expect(page.locator("#upload-button")).to_be_enabled()
    page.click("#upload-button")
    expect(page).to_have_url(re.compile(r"/datasets/\d+$"))
    seen = json.loads(page.evaluate("() => sessionStorage.getItem('upload-seen')"))
    assert seen == {"progressShown": True, "maxWidth": 100, "buttonDisabledInFlight": True}, seen
    return int(page.url.rsplit("/", 1)[1])


def check_dataset_detail(page: Page) -> None:
    """Preview rows, then token stats and the histogram with the demo model's tokenizer."""
    expect(page.get_by_role("heading", name="numbers_alpaca")).to_be_visible()
    expect(page.locator("dl.kv").first).to_contain_text(str(ROWS))
    first_rows = page.locator("section", has=page.get_by_role("heading", name="First rows"))
    expect(first_rows.locator("tbody tr").first).to_contain_text("Spell the number 0 in words.")

    page.select_option("#tok-model", label="demo-qwen2-tiny")
    expect(page.locator("#tok-template")).to_have_value("qwen")
    page.fill("#tok-cutoff", "72")
    page.click("#tokens >> xpath=preceding-sibling::form//button[@type='submit']")
    histogram = page.locator("#token-chart canvas")
    expect(histogram).to_be_visible(timeout=PAGE_TIMEOUT_MS * 2)
    expect(page.locator("#tokens")).to_contain_text("would be truncated")
    expect(page.locator("#tokens pre.rendered mark")).to_contain_text("zero")  # the trained-on response
    histogram.scroll_into_view_if_needed()
    page.evaluate("() => window.scrollBy(0, 200)")
    shoot(page, "dataset-detail", from_top=False)


def create_config(page: Page, url: str, dataset_id: int) -> int:
    """The form: Enter in a field saves nothing, a config without a dataset is not saved without an
    explicit confirmation, a bad learning rate is refused next to its field; then a CPU-sized
    config. The defaults already fit the CPU-only worker (no bf16, few processes)."""
    page.goto(url + "/configs/new")
    expect(page.locator("#worker-defaults")).to_contain_text("no GPU")
    expect(page.locator("#bf16")).not_to_be_checked()
    expect(page.locator("#preprocessing_num_workers")).to_have_value(str(max(1, min(16, os.cpu_count() // 2))))
    expect(page.locator("#dataloader_num_workers")).to_have_value("0")
    expect(page.locator("#section-train legend")).to_have_text("Training")  # words, not "### train"
    configs_before = len(page.request.get(url + "/api/v1/configs").json())

    page.evaluate("() => { window.__sameDocument = true; }")
    page.fill("#name", "numbers-lora")
    page.press("#name", "Enter")  # would submit the form: it must not
    page.fill("#per_device_train_batch_size", "7")
    page.press("#per_device_train_batch_size", "Enter")
    page.press("#per_device_train_batch_size", "Tab")
    # The live estimates answer the change (7 × accumulation 8) on this same document: Enter
    # submitted nothing.
    expect(page.locator("#estimates")).to_contain_text(re.compile(r"Effective batch\s*56\b"))
    assert page.evaluate("() => window.__sameDocument") is True, "Enter submitted the form"
    assert len(page.request.get(url + "/api/v1/configs").json()) == configs_before

    demo_model = page.locator("#model_id option", has_text="demo-qwen2-tiny").get_attribute("value")
    page.select_option("#model_id", value=demo_model)
    values = {
        "gpus": "0", "template": "qwen", "cutoff_len": "64", "max_samples": "", "logging_steps": "1",
        "save_steps": str(SAVE_STEPS),
        "per_device_train_batch_size": "8", "gradient_accumulation_steps": "1", "learning_rate": "-1",
        "num_train_epochs": "2", "val_size": "0.1", "eval_steps": "10",
    }
    for field, value in values.items():
        page.fill(f"#{field}", value)
    page.click("#section-eval details.more-settings summary")  # the folded settings open on a click
    page.fill("#per_device_eval_batch_size", "8")
    # The live estimates follow the form (batch 8 × accumulation 1).
    expect(page.locator("#estimates")).to_contain_text(re.compile(r"Effective batch\s*8\b"))
    expect(page.locator("#learning_rate")).to_have_attribute("aria-invalid", "true")  # marked as it changes
    shoot(page, "config-form")

    page.click("#save-config")  # no dataset chosen yet
    expect(page.locator("#no-dataset-warning")).to_contain_text("No dataset is chosen")
    expect(page.locator("#error-learning_rate")).to_be_visible()  # inline, next to the field
    expect(page.locator("#form-errors")).to_contain_text("Nothing was saved")
    expect(page.locator("#learning_rate")).to_be_focused()  # the first refused field
    expect(page.locator("#name")).to_have_value("numbers-lora")  # nothing typed was lost
    assert len(page.request.get(url + "/api/v1/configs").json()) == configs_before
    page.check(f"#dataset-{dataset_id}")
    page.fill("#learning_rate", "5e-3")
    page.click("#save-config")
    expect(page).to_have_url(re.compile(r"/configs/\d+$"))
    expect(page.locator("#config-yaml")).to_contain_text("learning_rate: 0.005")
    expect(page.locator("#config-yaml")).to_contain_text("include_num_input_tokens_seen: non_padding")
    return int(page.url.rsplit("/", 1)[1])


def start_run(page: Page) -> int:
    """A double click starts one run (the runs list counts them later)."""
    page.dblclick("#start-run button[type=submit]")
    expect(page).to_have_url(re.compile(r"/runs/\d+$"))
    return int(page.url.rsplit("/", 1)[1])


def watch_run_live(page: Page) -> None:
    """The loss and tokens/s charts gain points from the event stream while the page stays loaded
    (the config's default counts tokens); the worker the run landed on and the checkpoint table
    fill in from the same stream."""
    page.evaluate("() => { window.__noReload = true; }")
    page.wait_for_function(f"({LOSS_POINTS})() >= 3", timeout=TRAIN_TIMEOUT_MS)
    first = page.evaluate(LOSS_POINTS)
    page.wait_for_function(f"({LOSS_POINTS})() > {first}", timeout=TRAIN_TIMEOUT_MS)
    expect(page.locator("#run-worker")).to_contain_text(" on ")
    expect(page.locator("#run-steps")).not_to_have_text(re.compile(r"^0/"))
    width = page.evaluate("() => parseFloat(document.getElementById('run-progress-bar').style.width)")
    assert width > 0
    page.wait_for_function(f"({TOKENS_POINTS})() >= 1", timeout=TRAIN_TIMEOUT_MS)  # real tokens, by default
    expect(page.locator("#chart-tps-note")).to_be_hidden()
    expect(page.locator("#run-checkpoints")).to_contain_text(f"checkpoint-{SAVE_STEPS}", timeout=TRAIN_TIMEOUT_MS)
    page.wait_for_function(f"({LOSS_POINTS})() >= 12", timeout=TRAIN_TIMEOUT_MS)  # a curve worth showing
    assert page.evaluate("() => window.__noReload") is True, "the page reloaded"
    shoot(page, "run-dashboard")


def check_phone_width(page: Page, url: str, run_id: int) -> None:
    """The live dashboard on a phone: nothing overflows sideways."""
    phone = page.context.new_page()
    try:
        phone.set_viewport_size(PHONE)
        phone.goto(f"{url}/runs/{run_id}")
        phone.wait_for_function(f"({LOSS_POINTS})() >= 1", timeout=TRAIN_TIMEOUT_MS)
        overflow = phone.evaluate("() => [document.documentElement.scrollWidth, window.innerWidth]")
        assert overflow[0] <= overflow[1], f"horizontal overflow at phone width: {overflow}"
        shoot(phone, "run-dashboard-phone")
    finally:
        phone.close()


def check_run_links(page: Page, config_id: int, dataset_id: int) -> None:
    """The finished run links to its config and datasets, and shows its adapter."""
    expect(page.locator(f"a[href='/configs/{config_id}']").first).to_be_visible()
    expect(page.locator(f"a[href='/datasets/{dataset_id}']").first).to_be_visible()
    expect(page.locator("#run-artifacts")).to_contain_text("Download the adapter")
    check_times_localised(page)
    chart_points = page.evaluate(LOSS_POINTS)
    assert chart_points >= 10, chart_points
    # Each log line once (from the process's output; LLaMA-Factory's running_log.txt repeats it),
    # and the download has all of them.
    base, run_id = page.url.rsplit("/runs/", 1)
    logs = page.request.get(f"{base}/api/v1/runs/{run_id}/logs?limit=10000").json()
    assert logs and {line["source"] for line in logs} == {"stdout"}
    download = page.request.get(base + page.locator("#run-log-download").get_attribute("href"))
    assert download.text().splitlines() == [line["line"] for line in logs]


def cancel_and_resume_second_run(page: Page, first_run_id: int) -> None:
    """Run the same config again, cancel it from its dashboard after a checkpoint, resume it. The
    elapsed and remaining time carry across the attempts (LLaMA-Factory's clock starts again at
    0 on a resume), and the loss plot shown at the end is the resumed attempt's, not the
    cancelled one's from the browser's cache."""
    page.click("#run-header button:has-text('Run again')")
    expect(page).not_to_have_url(re.compile(rf"/runs/{first_run_id}$"))
    expect(page).to_have_url(re.compile(r"/runs/\d+$"))
    base, run_id = page.url.rsplit("/runs/", 1)
    # Once step SAVE_STEPS + 2 is on the chart, checkpoint-SAVE_STEPS is complete.
    page.wait_for_function(f"({LOSS_POINTS})() >= {SAVE_STEPS + 2}", timeout=TRAIN_TIMEOUT_MS)
    cancel = page.locator("#run-header button:has-text('Cancel')")
    cancel.click()
    expect_status(page, "cancelled", TRAIN_TIMEOUT_MS)
    plot = page.locator("#run-artifacts img[alt='training_loss.png']")  # saved by the cancelled attempt
    expect(plot).to_be_visible(timeout=PAGE_TIMEOUT_MS)
    cancelled_plot = plot.get_attribute("src")
    resume = page.locator("#run-header button:has-text('Resume')")
    expect(resume).to_be_visible()
    resume.click()
    expect(page.locator("#run-header")).to_contain_text("attempt 2", timeout=PAGE_TIMEOUT_MS)
    resumed_step = int(re.search(r"resumed from checkpoint-(\d+)", page.locator("#run-header").inner_text()).group(1))
    page.wait_for_function(f"parseInt(document.getElementById('run-steps').textContent) > {resumed_step}",
                           timeout=TRAIN_TIMEOUT_MS)
    before = check_time_across_attempts(page, base, run_id, resumed_step)
    expect_status(page, "succeeded", TRAIN_TIMEOUT_MS)
    finished = page.request.get(f"{base}/api/v1/runs/{run_id}").json()
    expect(page.locator("#run-elapsed")).to_have_text(duration(before + finished["elapsed_s"]))  # live, no reload
    expect(page.locator("#run-remaining")).to_have_text("0s")
    # The curve continued on the same chart (the page reloaded on resume): every step once.
    total = int(page.locator("#run-steps").inner_text().split("/")[1])
    steps = page.evaluate(f"() => ({live_chart('chart-loss')}).data[0]")
    assert steps == list(range(1, total + 1)), steps
    # The resumed attempt wrote the plot again: a new URL, and what it shows is what the server has now.
    expect(plot).not_to_have_attribute("src", cancelled_plot, timeout=PAGE_TIMEOUT_MS)
    assert plot.evaluate("(img) => img.complete && img.naturalWidth > 0")
    current = page.evaluate("""async (src) => {
      const bytes = async (url, options) => new Uint8Array(await (await fetch(url, options)).arrayBuffer());
      const shown = await bytes(src), served = await bytes(src.split("?")[0].replace("/runs/", "/api/v1/runs/"), { cache: "no-store" });
      return shown.length === served.length && shown.every((b, i) => b === served[i]);
    }""", plot.get_attribute("src"))
    assert current, "the loss plot shown is not the one the run has now"


def check_time_across_attempts(page: Page, base: str, run_id: str, resumed_step: int) -> float:
    """While attempt 2 runs: elapsed = attempt 1's time up to the checkpoint + attempt 2's; remaining
    = the steps left at attempt 2's own pace. One page load is one consistent snapshot of the shown
    values and of the run they are computed from; returns attempt 1's time up to the checkpoint."""
    html = page.request.get(f"{base}/runs/{run_id}").text()
    run = json.loads(html.split('id="run-data">')[1].split("</script>")[0])["run"]
    points = page.request.get(f"{base}/api/v1/runs/{run_id}/metrics").json()
    before = max(p["elapsed_s"] for p in points if p["step"] <= resumed_step and p["elapsed_s"] is not None)
    shown = {name: re.search(rf'id="run-{name}"[^>]*>([^<]*)<', html).group(1) for name in ("elapsed", "remaining")}
    assert shown["elapsed"] == duration(before + run["elapsed_s"]), (shown, run, before)
    if run["status"] == "running" and run["elapsed_s"] > 0:  # whole seconds: 0 says nothing about the pace yet
        done = run["current_step"] - resumed_step
        remaining = (run["total_steps"] - run["current_step"]) * run["elapsed_s"] / done
        assert shown["remaining"] == duration(remaining), (shown, run)
    return before


def screenshot_runs_list(page: Page, url: str) -> None:
    page.goto(url + "/runs")
    expect(page.locator("#run-table tbody tr")).to_have_count(2)
    expect(page.locator("#run-table .badge.succeeded")).to_have_count(2)
    expect(page.locator("#run-table .progress > span[style*='width: 100']")).to_have_count(2)
    check_times_localised(page)
    shoot(page, "runs")


def deploy(page: Page, url: str, run_id: int) -> int:
    """One click serves the first run's adapter on vLLM (CPU); the table follows it to ready."""
    page.goto(f"{url}/runs/{run_id}")
    page.click("#run-header a:has-text('Deploy')")
    expect(page.locator("#deploy-run")).to_have_value(str(run_id))  # the run page's run, preselected
    # The adapter is picked from what the run stored: its final adapter first, then its checkpoints.
    expect(page.locator("#deploy-checkpoint option").first).to_have_text("final adapter")
    expect(page.locator("#deploy-checkpoint option").nth(1)).to_have_text(re.compile(r"^checkpoint-\d+ \(step \d+\)"))
    page.fill("#deploy-name", "numbers")
    page.click("#deploy-form button[type=submit]")
    row = page.locator("#deployments-table tr[id^='deployment-']", has_text="numbers")
    expect(row).to_have_attribute("data-status", "ready", timeout=SERVE_TIMEOUT_MS)
    expect(row.locator(f"a[href='/runs/{run_id}']")).to_be_visible()
    check_times_localised(page)
    shoot(page, "deployments")
    return int(row.get_attribute("id").removeprefix("deployment-"))


def chat_in_playground(page: Page) -> None:
    """A streamed reply, Send disabled until its last token, the time to the first token and the
    tokens/s (the server's count) shown; a reload keeps the conversation."""
    page.click("#deployments-table a:has-text('Chat')")
    expect(page).to_have_url(re.compile(r"/playground\?model=numbers"))
    page.fill("#pg-max-tokens", "24")
    page.fill("#pg-input", "Spell the number 7 in words.")
    page.click("#pg-send")
    expect(page.locator("#pg-send")).to_be_disabled()
    stats = page.locator("#pg-stats")
    expect(stats).to_contain_text("tokens/s", timeout=SERVE_TIMEOUT_MS)
    expect(page.locator("#pg-send")).to_be_enabled()
    found = re.search(r"first token in ([\d.]+) s · ([\d.]+) tokens/s \((\d+) tokens\)", stats.inner_text())
    assert found and int(found.group(3)) > 1 and float(found.group(2)) > 0, stats.inner_text()
    reply = page.locator("#pg-chat-adapter .pg-msg.assistant").last
    text = reply.inner_text().strip()
    assert text, "empty reply"
    expect(page.locator("#pg-curl")).to_contain_text("/v1/chat/completions")
    shoot(page, "playground")
    page.reload()
    expect(page.locator("#pg-chat-adapter .pg-msg.user")).to_have_text(["Spell the number 7 in words."])
    expect(page.locator("#pg-chat-adapter .pg-msg.assistant")).to_have_text([text])

    # Side by side: the base model is given the same history (turn 1 with the adapter's answer).
    page.check("#pg-compare")
    expect(page.locator("#pg-chat-base .pg-msg.user")).to_have_text(["Spell the number 7 in words."])
    expect(page.locator("#pg-chat-base .pg-msg.assistant.replayed")).to_have_text([text])
    sent: list[dict] = []
    page.on("request", lambda request: request.url.endswith("/v1/chat/completions") and sent.append(request.post_data_json))
    page.fill("#pg-input", "And 8?")
    page.click("#pg-send")
    expect(stats).to_contain_text("base model: first token in", timeout=SERVE_TIMEOUT_MS)
    assert len(sent) == 2, sent
    adapter, base = sorted(sent, key=lambda body: body["model"] != "numbers")
    assert adapter["messages"] == base["messages"], (adapter["messages"], base["messages"])
    assert [(m["role"], m["content"]) for m in base["messages"][1:]] == [
        ("user", "Spell the number 7 in words."), ("assistant", text), ("user", "And 8?")]
    page.uncheck("#pg-compare")

    # A reply cut off by Stop (long before its 1,500 tokens) says so, and still does after a reload.
    page.fill("#pg-max-tokens", "1500")
    page.fill("#pg-input", "Count to a thousand.")
    page.click("#pg-send")
    page.click("#pg-stop")
    last = page.locator("#pg-chat-adapter .pg-msg").last
    expect(last).to_have_attribute("data-note", "stopped", timeout=SERVE_TIMEOUT_MS)
    expect(page.locator("#pg-send")).to_be_enabled()
    page.reload()
    expect(page.locator("#pg-chat-adapter .pg-msg.assistant").last).to_have_attribute("data-note", "stopped")
    expect(page.locator("#pg-chat-adapter .pg-msg.user")).to_have_count(3)


def undeploy(page: Page, url: str, deployment_id: int) -> None:
    page.goto(url + "/deployments")
    row = page.locator(f"#deployment-{deployment_id}")
    row.locator("button:has-text('Undeploy')").click()
    expect(page.locator(f"#deployment-{deployment_id}")).to_have_attribute("data-status", "stopped",
                                                                         timeout=SERVE_TIMEOUT_MS)
    # The server stops with its last adapter, a moment later: then nothing is left to chat with.
    reload_until(page, f"{url}/playground", page.locator(".empty", has_text="No model is ready"))


def evaluate_both_backends(page: Page, url: str, run_id: int) -> None:
    """From the run's page: its final adapter on its held-out rows with LLaMA-Factory's predict,
    then with vLLM; each table row fills in (with the base model's score beside it) without a
    reload; the generations page shows the rows side by side and searches them."""
    page.goto(f"{url}/runs/{run_id}")
    evaluations = page.locator("#evaluations-table tbody tr")
    for number, backend in enumerate(("llamafactory", "vllm"), start=1):
        page.select_option("#evaluate-checkpoint", value="")  # the final adapter
        page.select_option("#evaluate-dataset", value="")  # the run's held-out split
        page.select_option("#evaluate-backend", value=backend)
        page.fill("#evaluate-max-rows", str(EVAL_ROWS))
        page.click("#evaluate-form button[type=submit]")
        refused_or_listed(page, "#evaluations-table tbody tr", number)
        newest = evaluations.first  # newest first
        expect(newest).to_contain_text(backend)
        expect(newest).to_have_attribute("data-status", "succeeded", timeout=SERVE_TIMEOUT_MS)
        expect(newest.locator("td.mono").first).to_have_text(re.compile(r"^\d+\.\d\d$"))  # BLEU-4
        expect(newest.locator("td.mono").last).to_have_text(re.compile(r"^[+-]\d+\.\d\d$"))  # vs the base model
    shoot(page, "run-evaluations", from_top=False)
    evaluations.first.locator("a:has-text('generations')").click()
    expect(page.locator("#generations tbody tr")).to_have_count(EVAL_ROWS)
    first_prompt = page.locator("#generations tbody tr").first.locator("td").nth(1).inner_text()
    number = re.search(r"Spell the number (\d+) ", first_prompt).group(1)
    page.fill("#rows-search", f"Spell the number {number} in")
    expect(page.locator("#generations tbody tr")).to_have_count(1, timeout=PAGE_TIMEOUT_MS)
    expect(page.locator("#evaluation-rows")).to_contain_text("1 row(s)")
    page.go_back()


def merge_the_best_checkpoint(page: Page, url: str) -> str:
    """The export form offers the best checkpoint (lowest eval loss) first among the checkpoints;
    merging it registers a model, whose name the Models page shows. Returns that name."""
    best = page.locator("#export-checkpoint option", has_text="best: lowest eval loss")
    page.select_option("#export-checkpoint", value=best.get_attribute("value"))
    page.click("#export-form button[type=submit]")
    refused_or_listed(page, "#exports-table tbody tr", 1)
    row = page.locator("#exports-table tbody tr").first
    expect(row).to_have_attribute("data-status", "succeeded", timeout=SERVE_TIMEOUT_MS)
    expect(row).to_contain_text(best.get_attribute("value"))
    model_id = int(row.locator("a[href='/models']").inner_text().removeprefix("model #"))
    return page.request.get(f"{url}/api/v1/models/{model_id}").json()["name"]


def serve_merged_and_chat(page: Page, url: str, model_name: str) -> None:
    """"Serve merged" starts vLLM on the merged model alone (no LoRA); once it is ready the Models
    page offers Chat, and the playground streams its reply."""
    page.locator("#exports-table button:has-text('Serve merged')").first.click()
    expect(page).to_have_url(re.compile(r"/models"))
    chat = page.locator(f"a[href='/playground?model={model_name}']")
    reload_until(page, f"{url}/models", chat)
    chat.click()
    page.fill("#pg-max-tokens", "8")
    page.fill("#pg-input", "Spell the number 7 in words.")
    page.click("#pg-send")
    expect(page.locator("#pg-stats")).to_contain_text("tokens/s", timeout=SERVE_TIMEOUT_MS)
    assert page.locator("#pg-chat-adapter .pg-msg.assistant").last.inner_text().strip(), "empty reply"


def screenshot_workers(page: Page, url: str) -> None:
    page.goto(url + "/workers")
    expect(page.locator(".worker-card .badge", has_text="online")).to_have_count(1)  # the embedded worker
    expect(page.locator(".worker-card")).to_contain_text("training env")  # its doctor report
    shoot(page, "workers")


# --------------------------------------------------------------------------- helpers
def refused_or_listed(page: Page, rows: str, count: int) -> None:
    """After a form that starts a job: its table has `count` rows, or the refusal in the flash
    region is the failure (the panel's reason, instead of a timeout)."""
    page.wait_for_function(f"""() => document.querySelectorAll({json.dumps(rows)}).length >= {count}
        || document.getElementById("flash")?.textContent.trim()""", timeout=PAGE_TIMEOUT_MS)
    assert not page.locator("#flash").inner_text().strip(), page.locator("#flash").inner_text()
    expect(page.locator(rows)).to_have_count(count)


def expect_status(page: Page, status: str, timeout_ms: int) -> None:
    expect(page.locator("#run-header [data-status]")).to_have_text(status, timeout=timeout_ms)


def reload_until(page: Page, url: str, locator, timeout_s: float = SERVE_TIMEOUT_MS / 1000) -> None:
    """For a page that does not refresh itself: load it until `locator` is visible."""
    deadline = time.monotonic() + timeout_s
    while True:
        page.goto(url)
        try:
            expect(locator).to_be_visible(timeout=2000)
            return
        except AssertionError:
            assert time.monotonic() < deadline, f"{locator} not on {url} after {timeout_s} s"


def check_times_localised(page: Page) -> None:
    """Every <time> carries an unambiguous UTC instant and shows it in the browser's locale
    (polled: a table that htmx refreshes is localised a moment after each swap)."""
    times = """() => [...document.querySelectorAll("time[datetime]")].map((t) => ({
        iso: t.getAttribute("datetime"), text: t.textContent,
        local: new Date(t.getAttribute("datetime")).toLocaleString() }))"""
    all_localised = f"""() => {{ const all = ({times})();
        return all.length && all.every((t) => /(Z|[+-]\\d\\d:\\d\\d)$/.test(t.iso) && t.text === t.local); }}"""
    try:
        page.wait_for_function(all_localised, timeout=10_000)
    except PlaywrightTimeout:
        pytest.fail(f"times not localised on {page.url}: {page.evaluate(times)}")


def shoot(page: Page, name: str, *, from_top: bool = True) -> None:
    """A viewport screenshot (SCREENSHOTS/NAME.png; the README shows docs/screenshots/)."""
    page.evaluate(f"() => {{ document.activeElement?.blur(); if ({str(from_top).lower()}) window.scrollTo(0, 0); }}")
    page.screenshot(path=str(SCREENSHOTS / f"{name}.png"), animations="disabled", caret="hide")


_ONES = "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen " \
        "seventeen eighteen nineteen".split()
_TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()


def _spell(n: int) -> str:
    if n < 20:
        return _ONES[n]
    if n < 100:
        return _TENS[n // 10] + ("" if n % 10 == 0 else "-" + _ONES[n % 10])
    rest = n % 100
    return _ONES[n // 100] + " hundred" + ("" if rest == 0 else " and " + _spell(rest))
