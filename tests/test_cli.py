"""The `strata` command line against Strata served on a real local Ray
(configs/test.yaml), run in-process with typer's CliRunner (one test runs it as
a program). Output is read as a user reads it: files, tables, exit codes."""

from __future__ import annotations

import io
import json
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import tomllib
from PIL import Image
from pptx import Presentation
from psd_tools import PSDImage
from rich.console import Console
from typer.testing import CliRunner

from serve_app.cli import app, plan_outputs, print_jobs
from serve_app.client import Job
from tests.conftest import ROOT
from tests.images import flat_design, product_photo
from tests.test_remove_background_api import jpeg_bytes, png_bytes, red_disc_png

# Wide enough that rich never folds a reason or a path across lines.
runner = CliRunner(env={"COLUMNS": "400", "NO_COLOR": "1"})


def strata_cli(server: str, *args: str):
    return runner.invoke(app, [*args, "--server", server])


def summary_line(output: str) -> str:
    (line,) = [line for line in output.splitlines() if re.match(r"^\d+ images?: ", line)]
    return line


def table_cells(line: str) -> list[str]:
    """The cells of one line of a rich table (columns are at least two spaces apart)."""
    return re.split(r"\s{2,}", line.strip())


def make_photos(folder: Path, count: int, start: int = 0) -> dict[Path, tuple[int, int]]:
    """``count`` JPEG and PNG product shots of assorted sizes, half of them in a
    subfolder; their paths relative to ``folder`` and their sizes."""
    made = {}
    for i in range(start, start + count):
        width, height = 96 + 8 * i, 80 + 4 * (i % 5)
        rgb, _ = product_photo(width, height, seed=i)
        relative = Path("more" if i % 2 else ".") / (f"shot_{i:02d}.jpg" if i % 3 else f"shot_{i:02d}.png")
        path = folder / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(jpeg_bytes(rgb) if path.suffix == ".jpg" else png_bytes(rgb))
        made[relative] = (width, height)
    return made


# -- planning (no server) -----------------------------------------------------------


def test_a_folder_maps_to_the_same_places_under_out(tmp_path):
    (tmp_path / "in" / "sub").mkdir(parents=True)
    for name in ("a.jpg", "sub/b.PNG", "sub/.hidden.png", "notes.txt"):
        (tmp_path / "in" / name).write_bytes(b"x")
    plan = plan_outputs([tmp_path / "in"], tmp_path / "out", ".png")
    assert plan.todo == [(tmp_path / "in" / "a.jpg", tmp_path / "out" / "a.png"),
                         (tmp_path / "in" / "sub" / "b.PNG", tmp_path / "out" / "sub" / "b.png")]
    assert plan.ignored == 1 and plan.refused == []


def test_an_output_folder_inside_the_input_folder_is_not_read_as_input(tmp_path):
    (tmp_path / "photos" / "cut").mkdir(parents=True)
    (tmp_path / "photos" / "a.jpg").write_bytes(b"x")
    (tmp_path / "photos" / "cut" / "a.png").write_bytes(b"x")
    plan = plan_outputs([tmp_path / "photos"], tmp_path / "photos" / "cut", ".png")
    assert plan.todo == [(tmp_path / "photos" / "a.jpg", tmp_path / "photos" / "cut" / "a.png")]


def test_two_inputs_for_one_output_refuse_the_second(tmp_path):
    for name in ("logo.jpg", "logo.png"):
        (tmp_path / name).write_bytes(b"x")
    plan = plan_outputs([tmp_path / "logo.jpg", tmp_path / "logo.png"], tmp_path / "out", ".png")
    assert plan.todo == [(tmp_path / "logo.jpg", tmp_path / "out" / "logo.png")]
    assert [(source, "same output" in reason) for source, reason in plan.refused] == [(tmp_path / "logo.png", True)]


# -- remove-bg ------------------------------------------------------------------------


def test_remove_bg_processes_a_folder_of_20_images(strata, tmp_path):
    made = make_photos(tmp_path / "photos", 20)
    result = strata_cli(strata, "remove-bg", str(tmp_path / "photos"), "-o", str(tmp_path / "out"), "-j", "4",
                        "--model", "classic")
    assert result.exit_code == 0, result.output
    assert summary_line(result.stdout) == (f"20 images: 20 written, 0 skipped (output exists), 0 failed; "
                                           f"results in {tmp_path / 'out'}")
    written = sorted(p.relative_to(tmp_path / "out") for p in (tmp_path / "out").rglob("*") if p.is_file())
    assert written == sorted(relative.with_suffix(".png") for relative in made)
    for relative, size in made.items():
        image = Image.open(tmp_path / "out" / relative.with_suffix(".png"))
        assert image.format == "PNG" and image.mode == "RGBA" and image.size == size
    # One progress bar, finished.
    assert result.stderr.count("removing backgrounds") == 1 and "20/20" in result.stderr


def test_a_second_run_skips_the_finished_outputs(strata, tmp_path):
    make_photos(tmp_path / "photos", 20)
    args = ["remove-bg", str(tmp_path / "photos"), "-o", str(tmp_path / "out"), "--model", "classic"]
    assert strata_cli(strata, *args).exit_code == 0
    before = {p: p.stat().st_mtime_ns for p in (tmp_path / "out").rglob("*.png")}
    make_photos(tmp_path / "photos", 1, start=20)  # one new photo since
    result = strata_cli(strata, *args)
    assert result.exit_code == 0, result.output
    assert summary_line(result.stdout).startswith("21 images: 1 written, 20 skipped (output exists), 0 failed")
    assert {p: p.stat().st_mtime_ns for p in before} == before


def test_a_corrupt_file_is_a_failure_with_its_reason_and_exit_1(strata, client, tmp_path):
    make_photos(tmp_path / "photos", 3)
    good, _ = red_disc_png(200, 150)
    broken = tmp_path / "photos" / "broken.png"
    broken.write_bytes(good[: len(good) // 2])
    (tmp_path / "photos" / "readme.txt").write_text("not an image")
    reason = client.post("/v1/remove-background", files={"image": ("broken.png", broken.read_bytes())}).json()
    result = strata_cli(strata, "remove-bg", str(tmp_path / "photos"), "-o", str(tmp_path / "out"),
                        "--model", "classic")
    assert result.exit_code == 1
    assert summary_line(result.stdout).startswith("4 images: 3 written, 0 skipped (output exists), 1 failed")
    (failure,) = [line for line in result.stdout.splitlines() if "broken.png" in line]
    assert f"400 {reason['title']}: {reason['detail']}" in failure
    assert "1 files in the folders are not images" in result.stdout
    assert not (tmp_path / "out" / "broken.png").exists()
    assert len(list((tmp_path / "out").rglob("*.png"))) == 3


def test_remove_bg_takes_single_files_and_output_options(strata, tmp_path):
    data, _ = red_disc_png(320, 240)
    (tmp_path / "disc.png").write_bytes(data)
    result = strata_cli(strata, "remove-bg", str(tmp_path / "disc.png"), "-o", str(tmp_path / "out"),
                        "--model", "tiny", "--mask", "--format", "webp")
    assert result.exit_code == 0, result.output
    mask = Image.open(tmp_path / "out" / "disc.webp")
    assert mask.format == "WEBP" and mask.size == (320, 240)


def test_an_unreachable_server_fails_every_image_with_the_reason(tmp_path):
    make_photos(tmp_path / "photos", 2)
    result = strata_cli("http://127.0.0.1:9", "remove-bg", str(tmp_path / "photos"), "-o", str(tmp_path / "out"))
    assert result.exit_code == 1
    assert summary_line(result.stdout).startswith("2 images: 0 written, 0 skipped (output exists), 2 failed")
    assert result.stdout.count("Connection failed") == 2


# -- layers -------------------------------------------------------------------------------


def test_layers_writes_pngs_zip_psd_and_pptx_that_open(strata, tmp_path):
    rgb, _ = flat_design(480, 360, seed=1)
    (tmp_path / "poster.png").write_bytes(png_bytes(rgb))
    out = tmp_path / "out"
    result = strata_cli(strata, "layers", str(tmp_path / "poster.png"), "-o", str(out), "--layers", "3",
                        "--model", "classic", "--psd", "--zip", "--pptx")
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == ["layer_01.png", "layer_02.png", "layer_03.png",
                                                      "poster.pptx", "poster.psd", "poster.zip"]
    pngs = [(out / f"layer_{i:02d}.png").read_bytes() for i in (1, 2, 3)]
    layers = [np.asarray(Image.open(io.BytesIO(png))) for png in pngs]
    assert all(layer.shape == (360, 480, 4) for layer in layers)
    with zipfile.ZipFile(out / "poster.zip") as archive:
        assert archive.namelist() == ["layer_01.png", "layer_02.png", "layer_03.png", "manifest.json"]
        assert [archive.read(f"layer_{i:02d}.png") for i in (1, 2, 3)] == pngs
        names = [entry["name"] for entry in json.loads(archive.read("manifest.json"))["layers"]]
    psd = PSDImage.open(out / "poster.psd")
    assert (psd.width, psd.height) == (480, 360) and [layer.name for layer in psd] == names
    deck = Presentation(str(out / "poster.pptx"))
    (slide,) = deck.slides
    assert [shape.name for shape in slide.shapes] == names
    assert [shape.image.blob for shape in slide.shapes] == pngs
    # The live progress bar ended at the last of the model's steps.
    assert re.search(r"succeeded\s.*\s(\d+)/\1\s", result.stderr), result.stderr
    for name in names:
        assert name in result.stdout


def test_layers_without_bundle_flags_writes_only_the_pngs(strata, tmp_path):
    rgb, _ = flat_design(320, 240, seed=2)
    (tmp_path / "logo.png").write_bytes(png_bytes(rgb))
    result = strata_cli(strata, "layers", str(tmp_path / "logo.png"), "-o", str(tmp_path / "out"),
                        "-n", "2", "--model", "classic")
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["layer_01.png", "layer_02.png"]


def test_layers_of_a_photo_through_classic_prints_the_jobs_warning(strata, tmp_path):
    from skimage.data import astronaut  # a real photo, bundled with scikit-image

    (tmp_path / "astronaut.png").write_bytes(png_bytes(astronaut()))
    result = strata_cli(strata, "layers", str(tmp_path / "astronaut.png"), "-o", str(tmp_path / "out"),
                        "-n", "4", "--model", "classic")
    assert result.exit_code == 0, result.output
    assert "warning: only 1 of the 4 layers asked for have content" in " ".join(result.stderr.split())


def test_layers_reports_the_servers_reason_for_a_bad_parameter(strata, tmp_path):
    rgb, _ = flat_design(320, 240, seed=2)
    (tmp_path / "logo.png").write_bytes(png_bytes(rgb))
    result = strata_cli(strata, "layers", str(tmp_path / "logo.png"), "-o", str(tmp_path / "out"),
                        "--layers", "11", "--model", "classic")
    assert result.exit_code == 1
    assert "422 Invalid parameters: layers:" in result.stderr
    assert not (tmp_path / "out").exists()


# -- jobs, health ---------------------------------------------------------------------------


# A terminal of 80 columns: what the tables must fit with every value whole.
narrow = CliRunner(env={"COLUMNS": "80", "NO_COLOR": "1"})


def test_jobs_fits_80_columns_with_every_value_whole(strata, tmp_path):
    rgb, _ = flat_design(320, 240, seed=3)
    (tmp_path / "design.png").write_bytes(png_bytes(rgb))
    layers = strata_cli(strata, "layers", str(tmp_path / "design.png"), "-o", str(tmp_path / "out"),
                        "-n", "2", "--model", "classic")
    job_id = re.search(r"job (\S+) accepted", layers.stderr).group(1)
    result = narrow.invoke(app, ["jobs", "--status", "succeeded", "--limit", "100", "--server", strata])
    assert result.exit_code == 0, result.output
    assert max(map(len, result.stdout.splitlines())) <= 80
    header = next(line for line in result.stdout.splitlines() if "status" in line and "took" in line)
    assert table_cells(header) == ["id", "status", "model × layers", "created", "took"]
    (row,) = [table_cells(line) for line in result.stdout.splitlines() if job_id in line]
    assert row[:3] == [job_id, "succeeded", "classic ×2"]
    assert re.fullmatch(r"\d\d-\d\d \d\d:\d\d", row[3]) and re.fullmatch(r"\d+\.\d s", row[4])


def test_jobs_prints_a_jobs_warning_under_the_table(strata, tmp_path):
    from skimage.data import astronaut  # a real photo: classic finds fewer layers than asked

    (tmp_path / "astronaut.png").write_bytes(png_bytes(astronaut()))
    layers = strata_cli(strata, "layers", str(tmp_path / "astronaut.png"), "-o", str(tmp_path / "out"),
                        "-n", "4", "--model", "classic")
    job_id = re.search(r"job (\S+) accepted", layers.stderr).group(1)
    result = narrow.invoke(app, ["jobs", "--status", "succeeded", "--limit", "100", "--server", strata])
    assert result.exit_code == 0, result.output
    assert max(map(len, result.stdout.splitlines())) <= 80
    text = " ".join(result.stdout.split())  # the warning is wrapped as text
    assert f"{job_id} warning: only 1 of the 4 layers asked for have content" in text


def api_job(job_id: str, status: str, model: str, layers: int, **fields) -> Job:
    """A job as GET /v1/jobs/{id} answers it."""
    job = {"id": job_id, "kind": "layers", "status": status, "progress": 0.0, "step": None, "total_steps": None,
           "created_at": "2026-12-07T12:00:00Z", "started_at": None, "finished_at": None,
           "params": {"model": model, "layers": layers}, "error": None, "result": None, "warning": None,
           "attempts": 1, "cancel_requested": False}
    return Job.model_validate({**job, **fields})


def test_the_widest_job_rows_fit_80_columns_with_every_value_whole():
    jobs = [api_job("4k8paaVC98V2f2DI11NtbQ", "running", "qwen-image-layered", 10, progress=0.4,
                    started_at="2026-12-07T12:00:01Z"),
            api_job("7Hq2mZtXcV9bN4kLpR3sWd", "succeeded", "qwen-image-layered", 4,
                    started_at="2026-12-07T12:00:01Z", finished_at="2026-12-07T12:05:13.4Z",
                    warning="only 2 of the 4 layers asked for have content"),
            api_job("Zx81QwErTyUiOpAsDfGhJk", "failed", "classic", 3, error="the model replica died " * 5)]
    out = io.StringIO()
    print_jobs(Console(file=out, width=80, no_color=True, highlight=False), jobs, "http://127.0.0.1:8000")
    lines = out.getvalue().splitlines()
    assert max(map(len, lines)) <= 80
    rows = {cells[0]: cells for cells in map(table_cells, lines) if cells and cells[0] in {job.id for job in jobs}}
    assert rows["4k8paaVC98V2f2DI11NtbQ"][1:] == ["running 40%", "qwen-image-layered", "12-07 12:00"]
    assert rows["7Hq2mZtXcV9bN4kLpR3sWd"][1:] == ["succeeded", "qwen-image-layered ×4", "12-07 12:00", "312.4 s"]
    # The running job's layer count wrapped whole onto the next line, under its model.
    running = next(i for i, line in enumerate(lines) if line.startswith("4k8paaVC98V2f2DI11NtbQ"))
    assert table_cells(lines[running + 1]) == ["×10"]
    text = " ".join(out.getvalue().split())
    assert "7Hq2mZtXcV9bN4kLpR3sWd warning: only 2 of the 4 layers asked for have content" in text
    assert f"Zx81QwErTyUiOpAsDfGhJk error: {' '.join(('the model replica died ' * 5).split())}" in text


def test_health_fits_80_columns_with_every_value_whole(strata):
    result = narrow.invoke(app, ["health", "--server", strata])
    assert result.exit_code == 0, result.output
    assert max(map(len, result.stdout.splitlines())) <= 80
    assert f"Strata at {strata}: ok" in result.stdout
    background, layers = result.stdout.split("Layer decomposition (default: classic)")
    assert "Background removal (default: tiny)" in background

    def rows(text: str) -> dict[str, list[str]]:
        return {cells[0]: cells for cells in map(table_cells, text.splitlines()) if len(cells) >= 6}

    assert rows(background)["tiny"][1:] == ["birefnet", "cpu", "float32", "yes", "1 running"]
    assert rows(background)["classic"][1:] == ["classic", "cpu", "uint8", "yes", "1 running"]
    assert set(rows(layers)) == {"model", "classic", "tiny-qwen"}
    assert rows(layers)["tiny-qwen"][1:] == ["qwen-image-layered", "cpu", "float32", "yes", "1 running"]


def test_piped_layers_prints_one_line_per_layer_with_its_path_whole(strata, tmp_path):
    rgb, _ = flat_design(320, 240, seed=2)
    deep = tmp_path / ("a-folder-with-a-long-name-" * 3) / "out"
    (tmp_path / "logo.png").write_bytes(png_bytes(rgb))
    result = narrow.invoke(app, ["layers", str(tmp_path / "logo.png"), "-o", str(deep), "-n", "2",
                                 "--model", "classic", "--server", strata])
    assert result.exit_code == 0, result.output
    lines = [line.split("\t") for line in result.stdout.splitlines() if "\t" in line]
    assert [(cells[0], cells[3]) for cells in lines] == [("1", str(deep / "layer_01.png")),
                                                         ("2", str(deep / "layer_02.png"))]


@pytest.mark.parametrize("command", [["layers"], ["remove-bg"], []], ids=["layers", "remove-bg", "strata"])
def test_flags_show_no_type_in_help(command):
    result = narrow.invoke(app, [*command, "--help"])
    assert result.exit_code == 0
    assert "--help" in result.stdout and "<bool>" not in result.stdout


def test_the_server_comes_from_strata_url(strata):
    result = runner.invoke(app, ["health"], env={"STRATA_URL": strata, "COLUMNS": "400"})
    assert result.exit_code == 0, result.output
    assert f"Strata at {strata}" in result.stdout


def test_an_unreachable_server_is_an_error_exit(strata):
    result = strata_cli("http://127.0.0.1:9", "health")
    assert result.exit_code == 1 and "Connection failed" in result.stderr


# -- the console script -------------------------------------------------------------------------


def test_strata_is_a_console_script_of_the_package():
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["strata"] == "serve_app.cli:main"


def test_the_cli_runs_as_a_program(strata):
    result = subprocess.run([sys.executable, "-m", "serve_app.cli", "jobs", "--limit", "1"], cwd=ROOT,
                            capture_output=True, text=True, timeout=120, check=False,
                            env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "STRATA_URL": strata,
                                 "COLUMNS": "200"})
    assert result.returncode == 0, result.stderr
    assert f"Jobs at {strata}" in result.stdout


@pytest.mark.parametrize("args", [["remove-bg", "/no/such/photo.jpg", "-o", "out"], ["layers", "/no/such.png", "-o", "o"]])
def test_a_missing_input_is_a_usage_error(args):
    result = runner.invoke(app, args)
    assert result.exit_code == 2 and "does not exist" in result.output
