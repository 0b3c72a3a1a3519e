from typer.testing import CliRunner

from evomerge import __version__
from evomerge.cli import app
from evomerge.zoo import PREBUILT

runner = CliRunner()


def test_version_and_help():
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and result.output.strip() == f"evomerge {__version__}"
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in ["zoo", "inspect", "demo"]:
        assert command in result.output


def test_zoo_path_prints_the_prebuilt_directory():
    result = runner.invoke(app, ["zoo", "path"])
    assert result.exit_code == 0 and result.output.strip() == str(PREBUILT)


def test_inspect_summarises_layers_and_blocks(zoo):
    result = runner.invoke(app, ["inspect", str(zoo.model("base")), "--tensors"])
    assert result.exit_code == 0, result.output
    assert "4 layers" in result.output and "878,720 parameters" in result.output
    assert "model.layers.3.mlp.up_proj.weight" in result.output


def test_user_errors_are_one_line_without_traceback(tmp_path):
    import subprocess
    import sys

    (tmp_path / "pytorch_model.bin").write_bytes(b"x")
    run = subprocess.run(
        [sys.executable, "-m", "evomerge", "inspect", str(tmp_path)], capture_output=True, text=True
    )
    assert run.returncode == 1
    assert "Traceback" not in run.stderr
    assert run.stderr.strip().startswith("error:") and "pytorch_model.bin" in run.stderr
    assert len(run.stderr.strip().splitlines()) == 1
