"""What one step costs on Hugging Face Transformers families: SGD, an FNGD collect step and an FNGD
reuse step, measured side by side in one process (rounds interleave every case; medians).

    python benchmarks/hf_cost.py [--batch 8] [--tokens 32] [--rounds 15] [--quick] [--out FILE]

Each family is tiny and random-init (2 layers, width 64, no download), trained on one fixed batch
of ``--batch`` samples of ``--tokens`` tokens (ViT: 32x32 images, 16 patches). A step is
zero_grad + forward + backward + optimizer step. Every case owns its own copy of the model; all
copies' optimizers stay alive, so every case pays the same global-hook filtering. GPT-2 is also
timed with its Conv1D sampler switched off, so that the torch.func fallback covers Conv1D (what it
cost before the sampler). ``--quick``: 3 rounds, only to show that the script runs.
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import time

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
import transformers as tf  # noqa: E402
from transformers.pytorch_utils import Conv1D  # noqa: E402

from fngd_plugin import FNGD  # noqa: E402
from fngd_plugin import samplers as samplers_mod  # noqa: E402
from fngd_plugin.hf import prepare  # noqa: E402

WIDTH, VOCAB = 64, 512


def families() -> dict[str, tuple[torch.nn.Module, str]]:
    common = dict(vocab_size=VOCAB)
    return {
        "GPT-2": (tf.GPT2LMHeadModel(tf.GPT2Config(n_layer=2, n_embd=WIDTH, n_head=4, n_positions=128, resid_pdrop=0.0,
                                                   embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
                                                   **common)), "lm"),
        "BERT (seq. classification)": (tf.BertForSequenceClassification(tf.BertConfig(
            num_hidden_layers=2, hidden_size=WIDTH, num_attention_heads=4, intermediate_size=4 * WIDTH,
            max_position_embeddings=128, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, num_labels=3,
            **common)), "cls"),
        "T5 (conditional generation)": (tf.T5ForConditionalGeneration(tf.T5Config(
            num_layers=2, num_decoder_layers=2, d_model=WIDTH, d_kv=16, num_heads=4, d_ff=4 * WIDTH, dropout_rate=0.0,
            decoder_start_token_id=0, pad_token_id=0, **common)), "lm"),
        "Llama": (tf.LlamaForCausalLM(tf.LlamaConfig(
            num_hidden_layers=2, hidden_size=WIDTH, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=4 * WIDTH, max_position_embeddings=128, bos_token_id=0, eos_token_id=0, pad_token_id=0,
            **common)), "lm"),
        "ViT (image classification)": (tf.ViTForImageClassification(tf.ViTConfig(
            num_hidden_layers=2, hidden_size=WIDTH, num_attention_heads=4, intermediate_size=4 * WIDTH, image_size=32,
            patch_size=8, num_channels=3, num_labels=10, hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0)), "img"),
    }


def batch(kind: str, n: int, t: int) -> dict:
    g = torch.Generator().manual_seed(0)
    if kind == "img":
        return {"pixel_values": torch.randn(n, 3, 32, 32, generator=g),
                "labels": torch.randint(0, 10, (n,), generator=g)}
    x = torch.randint(1, VOCAB, (n, t), generator=g)
    if kind == "cls":
        return {"input_ids": x, "labels": torch.randint(0, 3, (n,), generator=g)}
    return {"input_ids": x, "labels": x.clone()}


def make_step(model: torch.nn.Module, opt: torch.optim.Optimizer, kw: dict):
    def step() -> None:
        opt.zero_grad()
        model(**kw).loss.backward()
        opt.step()

    return step


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--quick", action="store_true", help="3 rounds: shows that it runs, measures nothing")
    ap.add_argument("--out", default=None, help="also write the table to this file")
    args = ap.parse_args()
    rounds = 3 if args.quick else args.rounds
    torch.manual_seed(0)

    cases: dict[str, object] = {}
    built = families()
    for name, (model, kind) in built.items():
        model.train()
        kw = batch(kind, args.batch, args.tokens)
        m_sgd, m_col, m_reu = model, copy.deepcopy(model), copy.deepcopy(model)
        sgd = torch.optim.SGD(m_sgd.parameters(), lr=0.01, momentum=0.9)
        col = FNGD(m_col.parameters(), lr=0.01, reuse="off")  # every step a collect step
        reu = FNGD(m_reu.parameters(), lr=0.01, steps_per_epoch=1)  # one collect step, then reuse
        for opt, m in ((col, m_col), (reu, m_reu)):
            prepare(opt, m)
        cases[f"{name}|SGD"] = make_step(m_sgd, sgd, kw)
        cases[f"{name}|collect"] = make_step(m_col, col, kw)
        cases[f"{name}|reuse"] = make_step(m_reu, reu, kw)
        make_step(m_reu, reu, kw)()  # the collect step; every later one reuses
        assert not reu.in_collect_phase
        if name == "GPT-2":  # Conv1D through the torch.func fallback: its sampler left out while built
            m_gen = copy.deepcopy(model)
            saved = samplers_mod._SAMPLERS.pop(Conv1D)
            try:
                gen = FNGD(m_gen.parameters(), lr=0.01, reuse="off")
                assert gen.coverage["generic"].get("Conv1D") == 16, gen.coverage["line"]
                gen_step = make_step(m_gen, gen, kw)
                gen_step()  # routes are decided (and cached) on the first step
            finally:
                samplers_mod._SAMPLERS[Conv1D] = saved
            cases[f"{name}|collect, Conv1D by torch.func"] = gen_step
    for step in cases.values():  # warm-up
        step()
    times: dict[str, list[float]] = {k: [] for k in cases}
    for _ in range(rounds):
        for key, step in cases.items():
            t0 = time.perf_counter()
            step()
            times[key].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}

    lines = [f"# One step on tiny Hugging Face models: SGD vs FNGD (batch {args.batch}, {args.tokens} tokens)", "",
             f"CPU: {cpu_model()}; torch {torch.__version__}, transformers {tf.__version__}, "
             f"{torch.get_num_threads()} threads; {rounds} interleaved rounds, medians"
             + (" (--quick: not a measurement)" if args.quick else ""), "",
             "| family | SGD step (s) | FNGD collect step (s) | FNGD reuse step (s) | collect / SGD | reuse / SGD |",
             "|---|---|---|---|---|---|"]
    for name in built:
        s, c, r = med[f"{name}|SGD"], med[f"{name}|collect"], med[f"{name}|reuse"]
        lines.append(f"| {name} | {s:.4f} | {c:.4f} | {r:.4f} | {c / s:.2f}x | {r / s:.2f}x |")
    g = med.get("GPT-2|collect, Conv1D by torch.func")
    if g is not None:
        s, c = med["GPT-2|SGD"], med["GPT-2|collect"]
        lines += ["", f"GPT-2 collect step, Conv1D by its sampler: {c:.4f} s ({c / s:.2f}x SGD); by the torch.func "
                  f"fallback: {g:.4f} s ({g / s:.2f}x SGD); sampler {g / c:.2f}x faster"]
    text = "\n".join(lines)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
