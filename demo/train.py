"""`uwrt build-demo`: train the demo model on synthetic applicants and write a bundle.

Steps (progress bars with rate and ETA on a terminal, one log line per step or epoch always):
  1. generate applicants; time-split by as_of (earliest `train_frac` train, the rest test);
  2. featurize with the runtime's own featurizer (train/serve consistency by construction);
  3. train the sequence encoder multi-task: default within horizon (main), 30+ dpd within 90
     days, masked event type; the default/dpd heads also see the standardized tabular block so
     the embedding learns what the tabular features miss;
  4. XGBoost on tabular + embedding (shipped) and on tabular only (the baseline the encoder's
     lift is measured against); with `controls` (`--with-controls`, and the "full" preset) also
     the honesty control: a second encoder + XGBoost trained and tested on histories whose event
     contents were shuffled against their timestamps (`synth.shuffle_event_order`);
  5. write the bundle (uwrt.runtime.bundle.bundle.write_bundle) with model_card.json / model_card.md,
     which say which evidence the build carries.

Presets: "default" (what `make serve` builds: small enough to reach SERVING in well under a
minute on 2 cores, no shuffled control), "full" (the model card's evidence: 20,000 applicants,
6 epochs, the shuffled control) and "small" (seconds; tests). README: Commands, and
bench/RESULTS.md for the measured times and AUCs.

Not on the serving path. Deterministic for a given seed on a given machine (progress output
does not touch the bundle).
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import platform
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import xgboost as xgb
from torch import nn

from uwrt.demo import synth
from uwrt.demo.monitoring import development_stats
from uwrt.demo.signal_check import auc
from uwrt.runtime import __version__
from uwrt.runtime.bundle.bundle import Bundle, write_bundle
from uwrt.runtime.bundle.schema import EncoderConfig, FeatureSchema, Policy
from uwrt.runtime.encoders.torch_encoder import SequenceEncoder
from uwrt.runtime.featurize import FeatureBatch, PackedEvents, featurize

log = logging.getLogger("uwrt.demo")


@dataclass(frozen=True)
class DemoConfig:
    """What to train. The defaults are the "default" preset's; `preset()` names the others."""
    seed: int = 7
    n_applicants: int = 8000
    train_frac: float = 0.7
    epochs: int = 4
    batch_size: int = 128
    lr: float = 2e-3
    weight_decay: float = 1e-4
    mask_rate: float = 0.10
    dpd_weight: float = 0.5
    mask_weight: float = 0.2
    xgb_rounds: int = 300
    xgb_depth: int = 4
    xgb_eta: float = 0.05
    train_threads: int = 2
    encoder: EncoderConfig = EncoderConfig()
    policy: Policy = Policy(version="demo-policy-1")
    #: Also train the shuffled-event-order control (a second encoder: doubles the training time).
    controls: bool = False

    @classmethod
    def preset(cls, name: str, *, seed: int | None = None, n_applicants: int | None = None,
               epochs: int | None = None, controls: bool | None = None) -> DemoConfig:
        """A named preset: `default` (`make serve`), `full` (the model card's evidence, with the
        controls) or `small` (tests); keyword arguments that are not None override its values."""
        if name == "default":
            cfg = cls()
        elif name == "full":
            cfg = cls(n_applicants=20000, epochs=6, controls=True)
        elif name == "small":
            cfg = cls(n_applicants=600, epochs=1, xgb_rounds=30, encoder=EncoderConfig(max_history=64))
        else:
            raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
        given: dict[str, Any] = dict(seed=seed, n_applicants=n_applicants, epochs=epochs, controls=controls)
        over = {k: v for k, v in given.items() if v is not None}
        return dataclasses.replace(cfg, **over)


PRESETS = ("default", "full", "small")


def _bar(total: int, desc: str, unit: str):
    """A progress bar on stderr with rate and ETA; disabled (a no-op) when stderr is not a
    terminal, so logs and CI output get the per-step log lines only."""
    from tqdm import tqdm
    return tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, disable=None, leave=False,
                dynamic_ncols=True, unit_scale=total >= 10_000)


@contextlib.contextmanager
def _logs_above_bars() -> Iterator[None]:
    """Log records (ours and the runtime's) print above a live bar instead of through it."""
    from tqdm.contrib.logging import logging_redirect_tqdm
    with logging_redirect_tqdm():
        yield


class Heads(nn.Module):
    """Training-only heads on top of the encoder."""

    def __init__(self, enc: EncoderConfig, n_tab: int) -> None:
        super().__init__()
        self.task = nn.Linear(enc.emb_dim + n_tab, 2)        # [default, dpd30_90] logits
        self.masked = nn.Linear(enc.d_model, enc.n_event_types)


def _mask_events(ev: PackedEvents, rate: float, mask_id: int, gen: np.random.Generator
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Masked copies of (type_ids, mcc_ids, numeric) and the masked positions."""
    pos = np.flatnonzero((gen.random(len(ev.type_ids)) < rate) & (ev.type_ids > 0))
    t, m, x = ev.type_ids.copy(), ev.mcc_ids.copy(), ev.numeric.copy()
    t[pos] = mask_id
    m[pos] = 0
    x[pos[:, None], [0, 3, 4]] = 0.0      # amount, dpd, installment give the type away; keep time
    return t, m, x, pos


def train_encoder(batch: FeatureBatch, tab_std: np.ndarray, y: np.ndarray, y_dpd: np.ndarray,
                  cfg: DemoConfig, label: str) -> SequenceEncoder:
    torch.manual_seed(cfg.seed)
    gen = np.random.default_rng(cfg.seed + 1)
    enc = SequenceEncoder(cfg.encoder)
    heads = Heads(cfg.encoder, tab_std.shape[1])
    params = list(enc.parameters()) + list(heads.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    n = batch.batch_size
    steps_per_epoch = (n + cfg.batch_size - 1) // cfg.batch_size
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=cfg.epochs * steps_per_epoch,
                                                pct_start=0.15)
    pos_w = torch.tensor([(1 - y.mean()) / max(y.mean(), 1e-3), (1 - y_dpd.mean()) / max(y_dpd.mean(), 1e-3)])
    pos_w = pos_w.clamp(max=5.0).float()
    targets = torch.from_numpy(np.stack([y, y_dpd], 1).astype(np.float32))
    tab_t = torch.from_numpy(tab_std.astype(np.float32))
    enc.train()
    for epoch in range(cfg.epochs):
        t0 = time.perf_counter()
        perm = gen.permutation(n)
        tot, ntok = 0.0, 0
        bar = _bar(n, f"{label} epoch {epoch + 1}/{cfg.epochs}", "applicant")
        for s in range(0, n, cfg.batch_size):
            rows = perm[s:s + cfg.batch_size]
            ev = batch.events.select(rows)
            t, m, x, pos = _mask_events(ev, cfg.mask_rate, enc.mask_type_id, gen)
            emb, h = enc(torch.from_numpy(t), torch.from_numpy(m), torch.from_numpy(x), ev.cu_seqlens)
            logits = heads.task(torch.cat([emb, tab_t[rows]], 1))
            loss = F.binary_cross_entropy_with_logits(logits, targets[rows], pos_weight=pos_w, reduction="none")
            loss = loss[:, 0].mean() + cfg.dpd_weight * loss[:, 1].mean()
            if len(pos):
                loss = loss + cfg.mask_weight * F.cross_entropy(heads.masked(h[torch.from_numpy(pos)]),
                                                                torch.from_numpy(ev.type_ids[pos]))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            tot += float(loss.detach()) * len(rows)
            ntok += ev.n_tokens
            bar.update(len(rows))
            bar.set_postfix(loss=f"{tot / min(n, s + len(rows)):.4f}", refresh=False)
        bar.close()
        dt = time.perf_counter() - t0
        log.info("%s: epoch %d/%d loss %.4f (%.1fs, %.0fk tokens/s)", label, epoch + 1, cfg.epochs, tot / n, dt,
                 ntok / dt / 1000)
    enc.eval()
    return enc


@torch.inference_mode()
def embed(enc: SequenceEncoder, ev: PackedEvents, chunk: int = 512, desc: str = "embed") -> np.ndarray:
    out = []
    with _bar(ev.batch_size, desc, "applicant") as bar:
        for s in range(0, ev.batch_size, chunk):
            out.append(enc.encode_packed(ev.select(np.arange(s, min(s + chunk, ev.batch_size)))).numpy())
            bar.update(len(out[-1]))
    return np.concatenate(out).astype(np.float32)


def fit_xgb(X: np.ndarray, y: np.ndarray, cfg: DemoConfig, names: list[str], desc: str = "xgboost") -> xgb.Booster:
    dm = xgb.DMatrix(X, label=y.astype(np.float32), missing=np.nan, feature_names=names)
    params = {"objective": "binary:logistic", "eval_metric": "auc", "max_depth": cfg.xgb_depth,
              "eta": cfg.xgb_eta, "subsample": 0.8, "colsample_bytree": 0.8, "min_child_weight": 5,
              "tree_method": "hist", "nthread": cfg.train_threads, "seed": cfg.seed}

    class _Progress(xgb.callback.TrainingCallback):
        def __init__(self, bar) -> None:
            super().__init__()
            self.bar = bar

        def after_iteration(self, model, epoch: int, evals_log) -> bool:
            self.bar.update(1)
            return False                            # never stop early

    with _bar(cfg.xgb_rounds, desc, "round") as bar:
        return xgb.train(params, dm, num_boost_round=cfg.xgb_rounds, callbacks=[_Progress(bar)])


def _predict(b: xgb.Booster, X: np.ndarray) -> np.ndarray:
    return b.inplace_predict(X, missing=np.nan)


def build_demo(out_dir, cfg: DemoConfig = DemoConfig(), *, overwrite: bool = False) -> Bundle:
    """Train everything and write the bundle. Returns the loaded, verified bundle."""
    with _logs_above_bars():
        return _build_demo(out_dir, cfg, overwrite=overwrite)


def _build_demo(out_dir, cfg: DemoConfig, *, overwrite: bool) -> Bundle:
    t_all = time.perf_counter()
    torch.set_num_threads(cfg.train_threads)
    timings: dict[str, float] = {}
    log.info("building the demo bundle: %d applicants, %s, %s", cfg.n_applicants, _epochs(cfg.epochs),
             "with the shuffled-order control" if cfg.controls
             else "no shuffled-order control (--with-controls adds it)")

    t0 = time.perf_counter()
    with _bar(cfg.n_applicants, "generate", "applicant") as bar:
        data = synth.generate(cfg.n_applicants, cfg.seed, progress=bar.update)
    order = np.argsort(data.as_of_unix_s, kind="stable")
    n_train = int(len(order) * cfg.train_frac)
    tr, te = np.sort(order[:n_train]), np.sort(order[n_train:])
    timings["generate_s"] = time.perf_counter() - t0
    log.info("generated %d applicants in %.1fs (default rate %.3f; train %d, test %d, time split)",
             cfg.n_applicants, timings["generate_s"], data.default.mean(), len(tr), len(te))

    schema = FeatureSchema.build("demo-features-2", list(synth.APPLICANT_FEATURES), cfg.encoder.emb_dim,
                                 limits=synth.REQUEST_LIMITS)
    policy = dataclasses.replace(cfg.policy, reason_texts=dict(synth.REASON_TEXTS))

    def feats(reqs):
        fb, errors = featurize(reqs, schema, cfg.encoder)
        if errors:
            raise RuntimeError(f"generator produced invalid requests: {list(errors.values())[:3]}")
        return fb

    t0 = time.perf_counter()
    reqs = data.requests
    fb_tr, fb_te = feats([reqs[i] for i in tr]), feats([reqs[i] for i in te])
    if cfg.controls:
        rng = np.random.default_rng(cfg.seed + 2)
        fb_tr_sh = feats([synth.shuffle_event_order(reqs[i], rng) for i in tr])
        fb_te_sh = feats([synth.shuffle_event_order(reqs[i], rng) for i in te])
    timings["featurize_s"] = time.perf_counter() - t0
    log.info("featurized %d events in %.1fs", fb_tr.events.n_tokens + fb_te.events.n_tokens, timings["featurize_s"])

    y_tr, y_te = data.default[tr], data.default[te]
    d_tr = data.dpd30_90[tr]
    mu, sd = fb_tr.tabular.mean(0), fb_tr.tabular.std(0) + 1e-6
    std = lambda a: (a - mu) / sd  # noqa: E731

    t0 = time.perf_counter()
    enc = train_encoder(fb_tr, std(fb_tr.tabular), y_tr, d_tr, cfg, "encoder")
    timings["encoder_train_s"] = time.perf_counter() - t0
    if cfg.controls:
        t0 = time.perf_counter()
        enc_sh = train_encoder(fb_tr_sh, std(fb_tr_sh.tabular), y_tr, d_tr, cfg, "shuffled-control encoder")
        timings["control_encoder_train_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    names = schema.names
    n_tab = fb_tr.tabular.shape[1]
    X_tr = np.concatenate([fb_tr.tabular, embed(enc, fb_tr.events, desc="embed train")], 1)
    X_te = np.concatenate([fb_te.tabular, embed(enc, fb_te.events, desc="embed test")], 1)
    booster = fit_xgb(X_tr, y_tr, cfg, names, "xgboost (shipped)")
    b_tab = fit_xgb(X_tr[:, :n_tab], y_tr, cfg, names[:n_tab], "xgboost (tabular only)")
    a_tab = auc(y_te, _predict(b_tab, X_te[:, :n_tab]))
    a_enc = auc(y_te, _predict(booster, X_te))
    a_sh = None
    if cfg.controls:
        Xs_tr = np.concatenate([fb_tr_sh.tabular, embed(enc_sh, fb_tr_sh.events, desc="embed control train")], 1)
        Xs_te = np.concatenate([fb_te_sh.tabular, embed(enc_sh, fb_te_sh.events, desc="embed control test")], 1)
        b_sh = fit_xgb(Xs_tr, y_tr, cfg, names, "xgboost (shuffled control)")
        a_sh = auc(y_te, _predict(b_sh, Xs_te))
    timings["xgboost_train_s"] = time.perf_counter() - t0

    lift = a_enc - a_tab
    retained = (a_sh - a_tab) / lift if a_sh is not None and lift > 0 else None
    log.info("test AUC: tabular only %.4f, with the encoder %.4f (%+.4f from the encoder's view of the history)",
             a_tab, a_enc, lift)
    log.info("%s", control_summary(a_tab, a_enc, a_sh))

    booster.feature_names = None  # serve by position; the schema carries names
    card = {
        "model": "uwrt demo: sequence encoder + XGBoost", "seed": cfg.seed,
        "n_applicants": cfg.n_applicants, "n_train": int(len(tr)), "n_test": int(len(te)),
        "split": "time: earliest as_of for train, latest for test",
        "train_as_of_max": int(data.as_of_unix_s[tr].max()), "test_as_of_min": int(data.as_of_unix_s[te].min()),
        "default_rate_train": float(y_tr.mean()), "default_rate_test": float(y_te.mean()),
        "auc_tabular_only": a_tab, "auc_with_encoder": a_enc, "auc_shuffled_control": a_sh,
        "encoder_lift": lift, "shuffled_control_lift_retained": retained,
        "controls": {"tabular_only": True, "shuffled_event_order": cfg.controls},
        "acceptance": {"min_encoder_lift": MIN_LIFT, "encoder_lift_ok": lift >= MIN_LIFT,
                       "shuffled_control_loses_most": None if a_sh is None else bool(retained is not None
                                                                                      and retained < 0.5)},
        "config": _jsonable(dataclasses.asdict(cfg)),
        "versions": {"uwrt": __version__, "torch": torch.__version__, "xgboost": xgb.__version__,
                     "numpy": np.__version__, "python": platform.python_version()},
    }
    bundle = write_bundle(
        out_dir, bundle_id=f"uwrt-demo-s{cfg.seed}-n{cfg.n_applicants}",
        encoder_state={k: v.detach().clone().contiguous() for k, v in enc.state_dict().items()},
        encoder_config=cfg.encoder, tree_model=booster, tree_version=f"demo-xgb-{cfg.xgb_rounds}x{cfg.xgb_depth}",
        schema=schema, policy=policy,
        extra_files={"model_card.json": json.dumps(card, indent=2, sort_keys=True) + "\n",
                     "model_card.md": model_card_md(card),
                     # drift baseline (demo/monitoring.py): a fresh development sample's statistics
                     "monitoring.json": development_stats(seed=cfg.seed, n_applicants=cfg.n_applicants, schema=schema,
                                                          encoder_config=cfg.encoder, policy=policy, encoder=enc,
                                                          booster=booster)},
        created_by=f"uwrt {__version__} build-demo", overwrite=overwrite)
    # timings are logged, not stored: the bundle must be byte-identical for a given seed
    log.info("timings (s): %s", ", ".join(f"{k} {v:.1f}" for k, v in timings.items()))
    log.info("wrote bundle %s (%s) to %s in %.0fs total", bundle.bundle_id, bundle.bundle_digest[:12], out_dir,
             time.perf_counter() - t_all)
    return bundle


#: The encoder's AUC lift over the tabular-only model that the default and full builds must show.
MIN_LIFT = 0.02


def _epochs(n: int) -> str:
    return f"{n} epoch" + ("" if n == 1 else "s")


def control_summary(a_tab: float, a_enc: float, a_sh: float | None) -> str:
    """The shuffled-event-order control's result in words."""
    if a_sh is None:
        return ("shuffled-event-order control: not run (build with --with-controls or --preset full to test "
                "whether the encoder's gain comes from the order and timing of events)")
    lift, gain_sh = a_enc - a_tab, a_sh - a_tab
    head = f"shuffled-event-order control: AUC {a_sh:.4f} ({gain_sh:+.4f} against tabular only)."
    if lift <= 0:
        return f"{head} The encoder shows no gain in this build, so the control has nothing to explain"
    kept = gain_sh / lift
    if kept <= 0:
        return (f"{head} With each history's events shuffled against their dates the encoder adds nothing, "
                "so all of its gain comes from the order and timing of events")
    if kept < 0.5:
        return (f"{head} With each history's events shuffled against their dates the encoder keeps only "
                f"{kept:.0%} of its gain, so most of the gain comes from the order and timing of events")
    return (f"{head} With each history's events shuffled against their dates the encoder still keeps {kept:.0%} "
            "of its gain, so most of the gain does NOT come from event order (it may come from which events "
            "occur at all)")


def _jsonable(o):
    if isinstance(o, dict):
        return {k: _jsonable(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_jsonable(v) for v in o]
    return o


def model_card_md(c: dict) -> str:
    ok = c["acceptance"]
    sh = c["auc_shuffled_control"]
    lift_line = (f"Encoder lift: {c['encoder_lift']:+.4f} AUC (target >= {ok['min_encoder_lift']}: "
                 f"{'met' if ok['encoder_lift_ok'] else 'NOT met'}).")
    if not ok["encoder_lift_ok"]:
        lift_line += (f" This build ({c['n_applicants']} applicants, {_epochs(c['config']['epochs'])}) does not "
                      "show the encoder's lift: smaller builds show less of it, and the full build "
                      "(`uwrt build-demo --preset full`) is the reference evidence.")
    if sh is None:
        control_row = "| same, trained and tested on histories with shuffled event order (control) | not run |"
        evidence = ("This build carries the tabular-only baseline only. The shuffled-event-order control "
                    "(which tests that the gain comes from the order and timing of events, not from which "
                    "events occur) was not run: build with `--with-controls`, or `--preset full` for the "
                    "full evidence.")
    else:
        control_row = f"| same, trained and tested on histories with shuffled event order (control) | {sh:.4f} |"
        words = control_summary(c["auc_tabular_only"], c["auc_with_encoder"], sh)
        evidence = words[0].upper() + words[1:] + "."
    return f"""# Model card: {c['model']}

Synthetic data only (seeded generator, `demo/synth.py`); not for real credit decisions.

## Evaluation (held-out, {c['split']})
| model | test AUC |
|---|---|
| XGBoost, tabular features only (control) | {c['auc_tabular_only']:.4f} |
| XGBoost, tabular + sequence-encoder embedding (shipped) | {c['auc_with_encoder']:.4f} |
{control_row}

{lift_line}

{evidence}

## Data
{c['n_applicants']} synthetic applicants (seed {c['seed']}): {c['n_train']} train, {c['n_test']} test;
default rate {c['default_rate_train']:.3f} (train), {c['default_rate_test']:.3f} (test).

Versions: {', '.join(f'{k} {v}' for k, v in c['versions'].items())}.
"""
