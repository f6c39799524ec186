"""The offline stand-ins: the real architecture's config, a tiny random NemotronH with its own tokenizer, and a
plain-PyTorch stand-in for TRL's CUDA-only loss kernel.

The Hugging Face Hub is out of reach on CI machines (and on planes), so every step of the tutorial can run
on a ~400k-parameter model with every block type of the real one, saved as an ordinary model folder. Built on
first use by `helpers.model` (notebooks 02-03 and train.py); the benchmarks use the full-size config.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from helpers.config import SAMPLE_DIR, TINY_MODEL
ANSWER_TOKENS = [" A", " B", " C", " D"]
# One letter per layer: M = Mamba-2 ("linear_attention"), E = mixture of experts ("moe"),
# * = attention ("full_attention"), - = dense MLP ("mlp"); see NemotronHConfig._pattern_to_list.
NANO_PATTERN = "MEMEM*EMEMEM*EMEMEM*EMEMEM*EMEMEM*EMEMEMEM*EMEMEMEME"


# Configs ----------------------------------------------------------------------------------------


def nemotron_nano_config(**overrides):
    """The published Nemotron-3-Nano-30B-A3B architecture as a `NemotronHConfig`.

    Needs no download: build it on the meta device to count parameters.
    """
    from transformers import NemotronHConfig

    values = dict(
        vocab_size=131072, hidden_size=2688, hybrid_override_pattern=NANO_PATTERN,
        num_attention_heads=32, num_key_value_heads=2, head_dim=128,
        mamba_num_heads=64, mamba_head_dim=64, ssm_state_size=128, n_groups=8, conv_kernel=4, chunk_size=128,
        n_routed_experts=128, num_experts_per_tok=6, n_shared_experts=1,
        moe_intermediate_size=1856, moe_shared_expert_intermediate_size=3712,
        routed_scaling_factor=2.5, norm_topk_prob=True, n_group=1, topk_group=1, mlp_hidden_act="relu2",
        tie_word_embeddings=False, max_position_embeddings=262144, layer_norm_epsilon=1e-5,
    )
    return NemotronHConfig(**(values | overrides))


def tiny_config(vocab_size: int):
    """A NemotronH of ~400k parameters with every block type of the real model, fast on CPU.

    Layers "MEM*E": Mamba-2, MoE (4 routed experts, 2 active, plus a shared expert), attention.
    """
    return nemotron_nano_config(
        vocab_size=vocab_size, hidden_size=64, hybrid_override_pattern="MEM*E",
        num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        mamba_num_heads=8, mamba_head_dim=16, ssm_state_size=16, n_groups=2, chunk_size=16,
        n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
        moe_shared_expert_intermediate_size=64, max_position_embeddings=1024,
    )


FALLBACK_TEXTS = [
    "Question: Which nerve supplies the deltoid muscle? Choices: A. Axillary B. Radial C. Ulnar D. Median",
    "Answer: A Explanation: The axillary nerve (C5, C6) supplies the deltoid and teres minor.",
    "Question: Drug of choice for anaphylactic shock is Answer: B Explanation: intramuscular adrenaline.",
    "Koplik spots are pathognomonic of measles. Hypokalaemia causes U waves on the ECG.",
]


def sample_texts(folder: Path = SAMPLE_DIR) -> list[str]:
    """Every question, option and explanation string in `folder/*.jsonl` (MedMCQA rows).

    Falls back to a few built-in medical sentences when the folder has no data.
    """
    texts = []
    for path in sorted(Path(folder).glob("*.jsonl")):
        for line in path.read_text(encoding="utf-8").splitlines():
            row = json.loads(line) if line.strip() else {}
            fields = ("question", "opa", "opb", "opc", "opd", "exp")
            texts += [row[key] for key in fields if isinstance(row.get(key), str)]
    return texts or list(FALLBACK_TEXTS)


def train_tiny_tokenizer(texts: list[str], vocab_size: int = 2048):
    """Train a byte-level BPE tokenizer on `texts` and wrap it for transformers.

    " A".." D" must each be ONE token: evaluation compares the next-token logits of exactly
    those four ids after "Answer:".
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=["<unk>", "<s>", "</s>", "<pad>"],  # ids 0-3, like the real tokenizer
    )
    # The prompt words and letters, repeated, so that BPE learns " A".." D" as merges.
    seed_lines = [f"Question: Choices: Answer: {letter}. Explanation:" for letter in "ABCD"] * 25
    bpe.train_from_iterator(list(texts) + seed_lines, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
        model_max_length=1024,
    )
    # A very small vocabulary may have no room for those merges: add them as whole-word tokens.
    missing = [t for t in ANSWER_TOKENS if len(tokenizer.encode(t, add_special_tokens=False)) != 1]
    tokenizer.add_tokens([AddedToken(t, single_word=True, normalized=False) for t in missing])
    return tokenizer


def is_model_dir(folder: Path) -> bool:
    """True when `folder` holds a saved config, weights and tokenizer."""
    files = [folder / "config.json", folder / "tokenizer.json"]
    return all(f.is_file() for f in files) and any(folder.glob("*.safetensors"))


def build_tiny_model(out_dir=TINY_MODEL, texts=None, seed: int = 0, overwrite: bool = False) -> Path:
    """Save a randomly initialised tiny NemotronH and its tokenizer as a normal model folder.

    It stands in for the 30B model on CPU and in CI, so every step of the tutorial runs in
    seconds. Returns the folder; an existing one is reused unless `overwrite`.
    """
    from transformers import NemotronHForCausalLM

    out_dir = Path(out_dir)
    if is_model_dir(out_dir) and not overwrite:
        return out_dir
    tokenizer = train_tiny_tokenizer(sample_texts() if texts is None else texts)
    config = tiny_config(vocab_size=len(tokenizer))
    config.pad_token_id, config.bos_token_id = tokenizer.pad_token_id, tokenizer.bos_token_id
    config.eos_token_id = tokenizer.eos_token_id
    torch.manual_seed(seed)
    model = NemotronHForCausalLM(config)  # float32, fine on CPU
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    print(f"Tiny NemotronH ({sum(p.numel() for p in model.parameters()):,} parameters) saved to {out_dir}")
    return out_dir


class TorchLogProb:
    """TRL's chunked log-prob kernel (Triton, CUDA only) computed the plain way, for CPUs; autograd does the
    backward. helpers.training.cpu_loss_fallback puts it in TRL's place for the length of a `with` block."""

    @staticmethod
    def apply(hidden, weight, bias, targets, temperature, chunk_size, softcap, logit_scale, outputs):
        z = (hidden @ weight.t() + (bias if bias is not None else 0)).float() * logit_scale
        if softcap is not None:
            z = softcap * torch.tanh(z / softcap)
        logp = torch.log_softmax(z / temperature, dim=-1)
        target_logp = logp.gather(-1, targets[:, None]).squeeze(-1)
        z = z / temperature
        return (target_logp,
                -(logp.exp() * logp).sum(-1) if "entropy" in outputs else None,
                torch.logsumexp(2 * logp, -1).detach() if "log_sum_sq_probs" in outputs else None,
                z.mean(-1).detach() if "mean_logits" in outputs else None,
                (z.argmax(-1) == targets).detach() if "is_top1" in outputs else None)
