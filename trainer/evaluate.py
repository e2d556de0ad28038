"""`adakd eval` on a held-out cache: NLL of the true tokens, KL(teacher || student) on the cached support,
and top-1 agreement with the teacher, averaged over trained positions."""

from __future__ import annotations

import torch

from storage import CacheReader

from .batches import batches
from .losses import fkl, student_buckets, teacher_buckets
from .student import cache_tokenizer, check_vocabulary, load_student, student_tokenizer


@torch.no_grad()
def evaluate_cache(model_dir: str, cache: str, batch_tokens: int = 8192, chunk: int = 1024,
                   max_positions: int | None = None) -> dict[str, float]:
    reader = CacheReader(cache)
    model = load_student(model_dir)
    teacher_tok = cache_tokenizer(reader)
    check_vocabulary(model, student_tokenizer(model_dir, teacher_tok), teacher_tok, reader)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device).eval()
    base = getattr(model, model.base_model_prefix)
    weight = model.get_output_embeddings().weight
    vocab = weight.shape[0]
    nll = kl = agree = 0.0
    n = 0
    for b in batches(reader.stream(), batch_tokens, vocab):
        b = b.to(device)
        hidden = base(input_ids=b.input_ids, attention_mask=b.attention_mask).last_hidden_state[b.rows, b.cols]
        t = b.targets
        for c in range(0, hidden.shape[0], chunk):
            sl = slice(c, c + chunk)
            z = (hidden[sl] @ weight.t()).float()
            nll += torch.nn.functional.cross_entropy(z, t.labels[sl], reduction="sum").item()
            lp = teacher_buckets(t.topk_logprobs[sl], t.tail_logmass[sl], t.vocab_size)
            kl += fkl(lp, student_buckets(z, t.topk_ids[sl])).sum().item()
            agree += (z.argmax(-1) == t.topk_ids[sl, 0]).sum().item()
        n += hidden.shape[0]
        if max_positions and n >= max_positions:
            break
    if n == 0:
        return {"positions": 0, "nll": float("nan"), "kl": float("nan"), "top1_agreement": float("nan")}
    return {"positions": n, "nll": nll / n, "kl": kl / n, "top1_agreement": agree / n}
