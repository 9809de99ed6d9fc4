"""The dashboard in a real browser: upload (drag-and-drop and picker) with the validation report, create a
job from the page, watch its curves gain points, cancel it; a finished job's page (curves, checkpoints,
hyperparameters, resolved peft) and its artifact downloads; the jobs filter; the playground (chat, text-pair
classification, similarity); the API key.
"""

from __future__ import annotations

import json
import re
import subprocess
import tarfile
from pathlib import Path

import httpx
import pytest
from playwright.sync_api import Page, expect

from tests.e2e.conftest import CHAT_LINES, ROOT, SVFIT, Service
from tests.client_harness import cancel_unfinished
from tests.dashboard.conftest import upload, wait_for_status

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

BAD_LINES = '{"messages": []}\nnot json\n' + json.dumps(CHAT_LINES[0]) + "\n"


def points(page: Page) -> int:
    return int(page.locator(".charts").get_attribute("data-points") or 0)


@pytest.fixture(scope="module")
def finished_job(api: httpx.Client, chat_jsonl: Path) -> dict:
    """A short job with a validation file, evaluated and checkpointed every 4 steps, run to success."""
    train = upload(api, chat_jsonl)
    valid = upload(api, chat_jsonl)
    response = api.post("/fine_tuning/jobs", json={
        "model": "tiny-llama", "training_file": train["id"], "validation_file": valid["id"], "suffix": "ui",
        "seed": 3, "hyperparameters": {"n_epochs": 2, "batch_size": 2},
        "peft": {"type": "svfit", "target_modules": "all-linear", "checkpoint_every": 4, "eval_every": 4},
    })
    assert response.status_code == 200, response.text
    return wait_for_status(api, response.json()["id"], {"succeeded"})


def test_upload_by_drop_shows_the_validation_report_with_line_numbers(page: Page):
    page.goto("/ui/#/files")
    # A real drop event carrying a File, as the browser sends it when a file is dragged onto the zone.
    page.locator("#dropzone").evaluate(
        """(zone, text) => {
            const data = new DataTransfer();
            data.items.add(new File([text], "broken.jsonl", { type: "application/jsonl" }));
            zone.dispatchEvent(new DragEvent("drop", { dataTransfer: data, bubbles: true, cancelable: true }));
        }""",
        BAD_LINES,
    )
    card = page.locator("#uploads .upload[data-status=error]")
    expect(card).to_have_count(1)
    expect(card.locator(".badge")).to_have_text("error")
    expect(card.locator(".report-line .lineno")).to_have_text(["line 1", "line 2"])
    expect(card.locator(".report-summary")).to_contain_text("2 problem(s)")
    # The list shows it too, with the same report behind its "report" toggle.
    row = page.locator("#files tr[data-status=error]").first
    expect(row).to_contain_text("broken.jsonl")
    row.get_by_role("button", name="report").click()
    expect(page.locator("#files tr.details:visible .lineno").first).to_have_text("line 1")


def test_create_a_job_from_the_page_watch_its_curves_grow_and_cancel_it(page: Page, service: Service, tmp_path: Path):
    # Enough steps (50 epochs x 320 examples, batch 1) that the run is still going when we cancel it.
    big = tmp_path / "long.jsonl"
    big.write_text("".join(json.dumps(line) + "\n" for line in CHAT_LINES * 40))
    page.goto("/ui/#/files")
    page.set_input_files("#file-input", str(big))
    card = page.locator("#uploads .upload[data-status=processed]")
    expect(card).to_have_count(1)
    file_id = card.get_attribute("data-file")

    card.get_by_role("link", name="Fine-tune with it").click()
    form = page.locator("#new-job-form")
    expect(form.locator("select[name=training_file]")).to_have_value(file_id)
    form.locator("select[name=model]").select_option("tiny-llama")
    form.locator("input[name=n_epochs]").fill("50")
    form.locator("input[name=batch_size]").fill("1")
    form.locator("input[name=suffix]").fill("from-page")
    form.locator("textarea[name=peft_extra]").fill('{"checkpoint_every": 100000}')
    form.get_by_role("button", name="Create job").click()

    page.wait_for_url(re.compile(r"#/jobs/ftjob-"))
    job_id = page.url.rsplit("/", 1)[-1]
    try:
        watch_and_cancel(page)
    finally:
        cancel_unfinished(service, job_id)


def watch_and_cancel(page: Page) -> None:
    expect(page.locator(".toolbar .badge")).to_have_text("running", timeout=60_000)
    page.wait_for_function("() => Number(document.querySelector('.charts').dataset.points) >= 2", timeout=60_000)
    seen = points(page)
    # The page keeps polling: more points arrive without a reload.
    page.wait_for_function("n => Number(document.querySelector('.charts').dataset.points) > n", arg=seen)
    expect(page.locator("[data-chart=loss] canvas")).to_have_count(1)
    expect(page.locator("#events")).to_contain_text("Fine-tuning job started")

    page.locator("#job-cancel").click()
    expect(page.locator(".toolbar .badge")).to_have_text("cancelled", timeout=60_000)
    expect(page.locator("#job-cancel")).to_be_disabled()
    expect(page.locator("button[data-format=svfit]")).to_be_disabled()  # no final weights for a cancelled job


def test_a_finished_job_shows_curves_checkpoints_settings_and_downloads_artifacts(
    page: Page, finished_job: dict, tmp_path: Path
):
    job_id = finished_job["id"]
    page.goto(f"/ui/#/jobs/{job_id}")
    expect(page.locator(".toolbar .badge")).to_have_text("succeeded")
    expect(page.locator("#fine-tuned-model")).to_have_text(finished_job["fine_tuned_model"])
    total = finished_job["progress"]["total_steps"]
    expect(page.locator(".charts")).to_have_attribute("data-points", str(total))
    expect(page.locator(".chart canvas")).to_have_count(2)  # loss and accuracy, validation points included
    # Kept by retention: the two epochs' ends and the newest of those taken every 4 steps (one before the end).
    expect(page.locator("#checkpoints tbody tr")).to_have_count(3)
    expect(page.locator("#hyperparameters")).to_contain_text("n_epochs2")
    expect(page.locator("#hyperparameters")).to_contain_text("learning_rate")  # resolved from "auto"
    expect(page.locator("#peft")).to_contain_text("typesvfit")
    expect(page.locator("#peft")).to_contain_text("checkpoint_every4")

    with page.expect_download() as download_info:
        page.locator("button[data-format=svfit]").click()
    saved = tmp_path / "svfit.tar.gz"
    download_info.value.save_as(saved)
    with tarfile.open(saved) as archive:
        names = archive.getnames()
    assert any(name.endswith("adapter_config.json") for name in names), names

    # A checkpoint's weights, as a standard PEFT LoRA adapter.
    page.locator("#artifact-step").select_option("8")
    with page.expect_download() as download_info:
        page.locator("button[data-format=peft_lora]").click()
    assert "step-8" in download_info.value.suggested_filename
    saved = tmp_path / "lora.tar.gz"
    download_info.value.save_as(saved)
    with tarfile.open(saved) as archive:
        assert any(name.endswith("adapter_model.safetensors") for name in archive.getnames())

    # The per-step metrics CSV from `result_files`.
    with page.expect_download() as download_info:
        page.get_by_role("button", name="Download metrics CSV").click()
    saved = tmp_path / "metrics.csv"
    download_info.value.save_as(saved)
    header, *rows = saved.read_text().splitlines()
    assert "train_loss" in header and len(rows) >= total


def test_jobs_list_shows_progress_and_filters_by_status(page: Page, finished_job: dict):
    page.goto("/ui/#/jobs")
    row = page.locator(f"#jobs tr[data-job='{finished_job['id']}']")
    expect(row).to_contain_text("succeeded")
    expect(row).to_contain_text("svfit")
    expect(row).to_contain_text(f"{finished_job['progress']['total_steps']}/{finished_job['progress']['total_steps']}")
    page.locator("#job-filter").select_option("cancelled")
    expect(row).to_have_count(0)
    page.locator("#job-filter").select_option("succeeded")
    expect(row).to_have_count(1)
    page.locator("#job-search").fill("no-such-job")
    expect(page.locator("#jobs td.empty")).to_have_text("No job matches.")


def test_playground_streams_a_chat_reply_from_a_fine_tune(page: Page, finished_job: dict):
    page.goto(f"/ui/#/models?model={finished_job['fine_tuned_model']}")
    expect(page.locator(f"#fine-tunes tr[data-model='{finished_job['fine_tuned_model']}']")).to_have_count(1)
    expect(page.locator("#pg-model")).to_have_value(finished_job["fine_tuned_model"])
    page.locator("#pg-max-tokens").fill("6")
    page.locator("#pg-input").fill("what is good ?")
    page.locator("#pg-send").click()
    reply = page.locator("#pg-output .bubble.assistant .bubble-text")
    expect(reply).to_have_count(1)
    expect(reply).not_to_have_text("", timeout=60_000)
    expect(page.locator("#pg-send")).to_be_enabled()


def test_playground_sends_its_tools_with_a_chat_turn(page: Page, service: Service):
    page.goto("/ui/#/models?model=tiny-llama")
    expect(page.locator("#pg-model")).to_have_value("tiny-llama")
    tools = [{"type": "function", "function": {"name": "f"}}]  # short: tiny-llama reads 64 tokens
    page.locator("#pg-tools").fill(json.dumps(tools))
    page.locator("#pg-max-tokens").fill("2")
    page.locator("#pg-input").fill("hi")
    with page.expect_request("**/v1/chat/completions") as sent:
        page.locator("#pg-send").click()
    assert sent.value.post_data_json["tools"] == tools
    expect(page.locator("#pg-send")).to_be_enabled(timeout=60_000)
    page.locator("#pg-mode").select_option("classify")
    expect(page.locator("#pg-tools")).to_be_hidden()


def test_playground_compares_texts_with_an_encoders_embeddings(page: Page, service: Service):
    minilm = "sentence-transformers/all-MiniLM-L6-v2"  # the pretrained encoder every install has
    page.goto(f"/ui/#/models?model={minilm}")
    expect(page.locator("#pg-model")).to_have_value(minilm)
    page.locator("#pg-mode").select_option("similarity")
    page.locator("#pg-input").fill("The weather is lovely today.\nIt's so sunny outside!\nHe drove to the stadium.")
    page.locator("#pg-send").click()
    cells = page.locator("#pg-similarity td.mono")
    expect(cells).to_have_count(2, timeout=60_000)
    # sentence-transformers' published similarities for these sentences under this model
    assert [float(c) for c in cells.all_inner_texts()] == pytest.approx([0.6660, 0.1046], abs=2e-4)


def test_playground_sends_a_text_pair_from_its_second_box_when_classifying(page: Page, service: Service):
    page.goto("/ui/#/models?model=tiny-llama")
    expect(page.locator("#pg-model")).to_have_value("tiny-llama")
    expect(page.locator("#pg-pair")).to_be_hidden()  # chat has no second text
    page.locator("#pg-mode").select_option("classify")
    page.locator("#pg-input").fill("a man sleeps")
    page.locator("#pg-pair").fill("a person rests")
    with page.expect_request("**/v1/classifications") as sent:
        page.locator("#pg-send").click()
    assert sent.value.post_data_json == {"model": "tiny-llama",
                                         "input": {"text": "a man sleeps", "text_pair": "a person rests"}}
    # The service holds no classifier: the replica took the pair and refused the model, and the page says so.
    expect(page.locator("#playground")).to_contain_text("not a classification model")
    page.locator("#pg-mode").select_option("chat")
    expect(page.locator("#pg-pair")).to_be_hidden()


def test_the_key_typed_into_the_page_is_the_one_the_api_checks(page: Page, service: Service, finished_job: dict):
    page.goto("/ui/#/jobs")
    expect(page.locator(f"#jobs tr[data-job='{finished_job['id']}']")).to_have_count(1)

    # A key with our prefix is always checked, even on loopback: a wrong one is refused, and the page says so.
    page.locator("#apikey").fill("sk-svfit-not-a-real-key")
    page.locator("#keyform button").click()
    expect(page.locator("#banner")).to_contain_text("Incorrect API key")
    expect(page.locator(".error[data-code=invalid_api_key]")).to_be_visible()

    # A real key acts as its own organization, which sees none of the default organization's jobs.
    out = subprocess.run([*SVFIT, "keys", "create", "--org", "ui-test"], cwd=ROOT, env=service.env,
                         check=True, capture_output=True, text=True).stdout
    key = next(token for token in out.split() if token.startswith("sk-"))
    page.locator("#apikey").fill(key)
    page.locator("#keyform button").click()
    expect(page.locator("#jobs td.empty")).to_have_text("No jobs yet: create one.")
    assert page.evaluate("localStorage.getItem('svfit.apiKey')") == key

    page.reload()  # kept across visits
    expect(page.locator("#apikey")).to_have_value(key)
    page.locator("#apikey").fill("")
    page.locator("#keyform button").click()
    expect(page.locator(f"#jobs tr[data-job='{finished_job['id']}']")).to_have_count(1)
