"""The four notebooks, executed top to bottom on the offline default, in order; and their hygiene."""

import json

import pytest

from recipe.offline import build_tiny_model

NOTEBOOKS = ["01_data_exploration", "02_model_loading", "03_training", "04_unsloth_optimization"]


def cells(repo, name):
    return json.loads((repo / "notebooks" / f"{name}.ipynb").read_text())["cells"]


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_is_stripped_tagged_and_explained(repo, name):
    nb = json.loads((repo / "notebooks" / f"{name}.ipynb").read_text())
    assert nb["metadata"]["colab"]["gpuType"] == "A100" and nb["metadata"]["accelerator"] == "GPU"
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    assert all(not c["outputs"] and c["execution_count"] is None for c in code), "strip the outputs"
    tagged = [i for i, c in enumerate(nb["cells"]) if "parameters" in c["metadata"].get("tags", [])]
    assert len(tagged) == 1 and tagged[0] < 10, "one parameters cell near the top"
    for i, c in enumerate(nb["cells"]):
        if c["cell_type"] == "code":
            assert nb["cells"][i - 1]["cell_type"] == "markdown", f"code cell {i} has no explanation before it"
            assert "def " not in "".join(c["source"]), "logic belongs in helpers, not in cells"
    assert "notebook.setup()" in "".join(nb["cells"][2]["source"]), "the set-up cell comes first"


@pytest.mark.parametrize("name", NOTEBOOKS[:3])
def test_notebooks_01_to_03_never_import_the_fast_engine(repo, name):
    text = "".join("".join(c["source"]) for c in cells(repo, name))
    assert "fastpath" not in text.replace("fastpath/README", "")


@pytest.mark.parametrize("name", NOTEBOOKS[1:])
def test_notebooks_show_the_stack_they_teach(repo, name):
    code = "".join("".join(c["source"]) for c in cells(repo, name) if c["cell_type"] == "code")
    shown = {"02_model_loading": ["AutoModelForCausalLM.from_pretrained(", "LoraConfig(", "get_peft_model("],
             "03_training": ["from_pretrained(", "LoraConfig(", "get_peft_model(", "SFTConfig(", "SFTTrainer(",
                             "trainer.train("],
             "04_unsloth_optimization": ["FastLanguageModel.from_pretrained(", "FastLanguageModel.get_peft_model(",
                                         "SFTTrainer(", "trainer.train("]}[name]
    assert [call for call in shown if call not in code] == []


def tagged_cell(repo, name, tag):
    found = [c for c in cells(repo, name) if tag in c["metadata"].get("tags", [])]
    assert len(found) == 1, f"one cell tagged {tag!r} in {name}"
    return "".join(found[0]["source"])


@pytest.mark.parametrize("overrides", [{}, {"routed_experts": True, "max_steps": 7, "learning_rate": 1e-3,
                                            "gradient_accumulation_steps": 1, "run_name": "x"}])
def test_notebook_03_configs_are_what_train_py_runs(repo, overrides, tmp_path):
    """What a learner reads in notebook 03 is what train.py runs headless: the same LoraConfig and SFTConfig."""
    import train
    from helpers import model as helpers_model
    from helpers.config import TrainConfig

    cfg = TrainConfig(output_root=str(tmp_path), **overrides)
    import torch

    from helpers import quant

    namespace = {"cfg": cfg, "model": helpers_model, "torch": torch, "quant": quant,  # what the notebook defined
                 "precision": "bf16"}                                                 # in earlier cells
    exec(tagged_cell(repo, "03_training", "lora-config"), namespace)
    exec(tagged_cell(repo, "03_training", "sft-config"), namespace)
    assert namespace["lora_config"].to_dict() == train.lora_config(cfg).to_dict()
    namespace["precision"] = "nf4"
    exec(tagged_cell(repo, "03_training", "lora-config"), namespace)
    assert namespace["lora_config"].to_dict() == train.lora_config(cfg, "nf4").to_dict()
    assert namespace["sft_config"].to_dict() == train.sft_config(cfg).to_dict()
    assert train.sft_config(cfg.replace(learning_rate=5e-5)).to_dict() != namespace["sft_config"].to_dict()


@pytest.fixture(scope="module")
def offline(tmp_path_factory):
    """Shared offline parameters: the tiny model, the shipped sample, outputs in a temporary folder."""
    root = tmp_path_factory.mktemp("nb")
    tiny = build_tiny_model(root / "tiny-nemotron")
    return {"root": root, "MODEL_ID": str(tiny), "DATA_SOURCE": "data/sample", "DATA_DIR": str(root / "formatted")}


def execute(repo, name, out_dir, **parameters):
    import papermill
    out = out_dir / f"{name}.ipynb"
    papermill.execute_notebook(str(repo / "notebooks" / f"{name}.ipynb"), str(out), parameters=parameters,
                               cwd=str(repo / "notebooks"), kernel_name="python3", progress_bar=False)
    return json.loads(out.read_text())


def text_of(nb):
    """Everything the executed notebook printed or displayed, as one string."""
    parts = []
    for c in nb["cells"]:
        for o in c.get("outputs", []):
            parts.append("".join(o.get("text", "")))
            parts.append("".join(o.get("data", {}).get("text/plain", "")))
    return "\n".join(parts)


def test_notebooks_run_in_order_offline(repo, offline, monkeypatch):
    root = offline["root"]
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    nb1 = execute(repo, NOTEBOOKS[0], root, DATA_SOURCE=offline["DATA_SOURCE"], MODEL_ID=offline["MODEL_ID"],
                  DATA_DIR=offline["DATA_DIR"], MAX_LENGTH=512)
    out1 = text_of(nb1)
    assert "cop is 0-based" in out1 and "validation" in out1
    assert sum("image/png" in o.get("data", {}) for c in nb1["cells"] for o in c.get("outputs", [])) >= 3
    assert (root / "formatted" / "manifest.json").exists()

    nb2 = execute(repo, NOTEBOOKS[1], root, MODEL_ID=offline["MODEL_ID"])
    out2 = text_of(nb2)
    assert "active per token" in out2 and "trainable params" in out2 and "5 layers: MEM*E" in out2
    assert "0.00B" not in out2 and "noise" in out2

    nb3 = execute(repo, NOTEBOOKS[2], root, MODEL_ID=offline["MODEL_ID"], DATA_DIR=offline["DATA_DIR"],
                  RUN_NAME="nb03", MAX_STEPS=8, BATCH_SIZE=4, GRAD_ACCUM=1, LEARNING_RATE=1e-3, SAVE_STEPS=4,
                  LOGGING_STEPS=1, EVAL_BATCH_SIZE=8, OUTPUT_ROOT=str(root / "outputs"))
    out3 = text_of(nb3)
    assert "first trained token" in out3 and "same answers as before saving: True" in out3
    assert "always answering A scores" in out3 and "text is noise" in out3
    record = json.loads((root / "outputs" / "runs" / "nb03" / "metrics.json").read_text())
    assert record["steps"] == 8 and record["stack"] == "standard" and len(record["loss_history"]) >= 8

    nb4 = execute(repo, NOTEBOOKS[3], root, BASELINE_RUN=str(root / "outputs" / "runs" / "nb03"))
    out4 = text_of(nb4)
    assert "no CUDA GPU" in out4 and "reference records measured on" in out4 and "hours" in out4
    assert "fast vs standard" in out4 and "unsloth vs standard" in out4 and "warm-up steps" in out4
    assert "same?" in out4 and " NO" not in out4  # the three committed GPU runs trained the same adapters
