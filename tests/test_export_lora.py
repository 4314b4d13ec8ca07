"""LoRA (peft) stages, adapters in peft's format, and export to an HF-native directory that
transformers' AutoModelForImageTextToText loads with the same logits."""

from __future__ import annotations

import json

import pytest
import torch
from model_fixtures import make_run_dir
from peft import PeftModel
from test_loading import logits, sample
from transformers import AutoModelForImageTextToText, AutoTokenizer

from conftest import compose_config
from vlmtrain.inference.engine import InferenceEngine, Prompt
from vlmtrain.models.build import apply_stage, build_model, load_tokenizer
from vlmtrain.models.checkpoint import load_trained
from vlmtrain.models.export import export
from vlmtrain.models.lora import save_adapter


def _export_cfg(ckpt, out):
    from omegaconf import OmegaConf

    return OmegaConf.create({"ckpt": str(ckpt), "out": str(out), "dtype": None, "max_tiles": 4})


@pytest.mark.parametrize("targets", ["[llm_attention]", "[llm_attention,llm_mlp]", "[llm_attention,llm_mlp,vit]"])
def test_lora_targets_and_trainable_parts(targets):
    cfg = compose_config(["stage=lora", f"stage.lora.targets={targets}"])
    model = build_model(cfg.model, load_tokenizer(cfg.model))
    trainable = apply_stage(model, cfg.stage)
    adapted = {n.split(".lora_")[0] for n in trainable if ".lora_" in n}
    assert any("self_attn.q_proj" in n for n in adapted)
    assert any("mlp.gate_proj" in n for n in adapted) == ("llm_mlp" in targets)
    assert any("vision_tower" in n for n in adapted) == ("vit" in targets)
    full = [n for n in trainable if ".lora_" not in n]
    assert full and all(n.startswith("model.multi_modal_projector.") for n in full)  # projector trains fully
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert any("base_layer" in n for n in frozen) and "lm_head.weight" in frozen


def test_lora_part_both_full_and_adapted_is_an_error():
    cfg = compose_config(["stage=lora", "stage.trainable=[language_model]"])
    model = build_model(cfg.model, load_tokenizer(cfg.model))
    with pytest.raises(ValueError, match="both in stage.trainable and adapted"):
        apply_stage(model, cfg.stage)


def test_adapter_saves_in_peft_format(tmp_path):
    cfg = compose_config(["stage=lora", "stage.lora.targets=[llm_attention,vit]"])
    tok = load_tokenizer(cfg.model)
    model = build_model(cfg.model, tok)
    apply_stage(model, cfg.stage)
    model.eval()  # after injection: new adapter layers (their dropout) start in train mode
    with torch.no_grad():  # adapters and the fully trained projector move away from their init
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    out = save_adapter(model, tmp_path / "adapter", cfg.stage.lora, list(cfg.stage.trainable))
    assert json.loads((out / "adapter_config.json").read_text())["peft_type"] == "LORA"
    base = build_model(cfg.model, tok).eval()  # same seed: the frozen weights the adapters sit on
    peft_model = PeftModel.from_pretrained(base, str(out)).eval()
    ids, px = sample(base, tok)
    with torch.no_grad():
        ref = model(input_ids=ids, pixel_values=px).logits
        got = peft_model(input_ids=ids, pixel_values=px).logits
    assert torch.allclose(got, ref, atol=1e-6, rtol=0)


@pytest.mark.slow
def test_lora_stage_trains_and_saves_adapter(tmp_path):
    from vlmtrain.training.run import train

    cfg = compose_config(["stage=lora", "stage.max_steps=2", "data.num_workers=0", "trainer.enable_progress_bar=false"], run_dir=tmp_path / "run")
    run = train(cfg)
    assert (run / "adapter" / "adapter_model.safetensors").is_file()
    trained = load_trained(run)  # merged
    assert not any("lora_" in k for k in trained.model.state_dict())


@pytest.mark.parametrize("stage", ["instruction_tuning", "lora"])
def test_export_loads_in_transformers_with_equal_logits(tmp_path, stage):
    overrides = [f"stage={stage}"] + (["stage.trainable=[vision_tower,multi_modal_projector]",
                                       "stage.lora.targets=[llm_attention,llm_mlp]"] if stage == "lora" else [])
    make_run_dir(tmp_path / "run", overrides)
    trained = load_trained(tmp_path / "run")  # LoRA merged here
    out = export(_export_cfg(tmp_path / "run", tmp_path / "hf"))
    assert json.loads((out / "config.json").read_text())["architectures"] == ["InternVLForConditionalGeneration"]
    hf = AutoModelForImageTextToText.from_pretrained(str(out), local_files_only=True).eval()
    tok = AutoTokenizer.from_pretrained(str(out), local_files_only=True)
    ids, px = sample(hf, tok, tiles=2)
    assert torch.equal(logits(hf, ids, px), logits(trained.model, ids, px))
    if stage == "lora":  # the merged weights give the adapted model's outputs; the trained ViT is kept
        ckpt = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
        vit = {k.removeprefix("model."): v for k, v in ckpt.items() if k.startswith("model.model.vision_tower.")}
        sd = hf.state_dict()
        assert vit and all(torch.equal(sd[k], v) for k, v in vit.items())
        from vlmtrain.models.lora import add_lora

        unmerged = build_model(trained.model_cfg, tok)
        cfg = compose_config(overrides)
        add_lora(unmerged, cfg.stage.lora)
        unmerged.load_state_dict({k.removeprefix("model."): v for k, v in ckpt.items()})
        assert torch.allclose(logits(unmerged.eval(), ids, px), logits(hf, ids, px), atol=1e-5, rtol=0)


def test_export_chat_template_and_processor_match_training(tmp_path):
    make_run_dir(tmp_path / "run")
    out = export(_export_cfg(tmp_path / "run", tmp_path / "hf"))
    tok = AutoTokenizer.from_pretrained(str(out), local_files_only=True)
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour?"}]},
        {"role": "assistant", "content": "red"},
        {"role": "user", "content": "And the shape?"},
    ]
    rendered = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    engine = InferenceEngine(load_trained(out), max_tiles=4)
    from PIL import Image

    img = Image.new("RGB", (300, 200), (200, 30, 30))
    ids, px = engine.encode(Prompt("And the shape?", [img], history=[("<image>\nWhat colour?", "red")]))
    n_tiles = px.shape[0]
    expanded = rendered.replace("<IMG_CONTEXT>", "<img>" + "<IMG_CONTEXT>" * (64 * n_tiles) + "</img>")
    assert tok.encode(expanded, add_special_tokens=False) == ids
    # the exported image processor settings tile exactly like training
    from transformers.models.got_ocr2 import GotOcr2ImageProcessorPil

    cfg = json.loads((out / "preprocessor_config.json").read_text())
    cfg.pop("image_processor_type"), cfg.pop("processor_class")
    hf_px = GotOcr2ImageProcessorPil(**cfg)(images=[img], return_tensors="pt")["pixel_values"]
    assert hf_px.shape == px.shape and torch.allclose(hf_px, px, atol=1e-4)
    tv = pytest.importorskip("torchvision", reason="AutoProcessor needs torchvision in transformers 5")
    del tv
    from transformers import AutoProcessor

    proc = AutoProcessor.from_pretrained(str(out), local_files_only=True)
    batch = proc(images=[img], text=[rendered], return_tensors="pt")
    assert batch["input_ids"][0].tolist() == ids


def test_init_from_a_lora_run_starts_from_merged_weights(tmp_path):
    from vlmtrain.training.run import init_weights_from

    make_run_dir(tmp_path / "run", ["stage=lora"])
    cfg = compose_config(["stage=instruction_tuning"])
    tok = load_tokenizer(cfg.model)
    model = build_model(cfg.model, tok)
    init_weights_from(model, str(tmp_path / "run"))
    merged = load_trained(tmp_path / "run").model.state_dict()
    assert all(torch.equal(v, merged[k]) for k, v in model.state_dict().items())
