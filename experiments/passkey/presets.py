"""Presets of the PassKey extrapolation experiment (issue 6): which models, which curriculum, which eval.

    .venv/bin/python -m experiments.passkey.run --preset=NAME --out=runs/...

Presets whose models needed a training option removed in issue 20 (null_slot, stretch, age, read_age,
read_stretch, inflate, norm_penalty, change_penalty, pre_age) are gone; check out fd01abd to rerun them
(README.md lists them).

A preset is a dict:
  models:  name -> (config file, {config override: value}[, init workdir]); every model gets the same
           curriculum; with an init workdir stage 1 fine-tunes from that run's newest checkpoint
  stages:  list of {config override: value} applied in order; stage k fine-tunes from stage k-1's checkpoint
           ("steps" is the number of optimizer steps of that stage, not the cumulative count)
  eval:    multipliers of N (N = the longest training filler of the last stage), examples per length,
           chunk_size / batch_size of the streaming evaluator, seed of the eval examples, and optionally
           key_position ("uniform" | "start" | "end"; default: as the model's training data placed the key)
"""

FAM = ("configs/passkey_tiny.py", {})
# `tiny` and `rsp_finetune` fine-tune the `make train` model of 2026-11-26 (filler 16-180, 32 x 256, 1200
# steps); `make train` now trains on filler 16-90. To rerun them as recorded, first train that model with
#   make train TRAIN_ARGS="--config.data.passkey.train_filler_max=180 --config.data.seq_len=256
#                          --config.data.batch_size=32 --config.train.steps=1200"
# (`chain` fine-tunes the current `make train` model).
BSWA = "configs/passkey_bswa_tiny.py"

# Shared by every stage unless a stage changes it: no intermediate checkpoints or evals (the script
# evaluates by streaming at the end), only the 1x eval split prepared.
# The data of every stage-1 run here is pinned (filler 16-180, so N = 180, in 32 rows of 256 tokens): these
# are the settings all results in benchmarks/RESULTS.md were measured with, whatever passkey_tiny uses now.
COMMON = {
    "data.passkey.train_filler_min": 16,
    "data.passkey.train_filler_max": 180,
    "data.seq_len": 256,
    "data.batch_size": 32,
    "checkpoint.every_steps": 0,
    "eval.every_steps": 0,
    "eval.batches": 2,
    "train.log_every": 50,
    "data.passkey.eval_multipliers": "(1,)",
    "data.passkey.eval_examples": 10,
}

# The data of the current `make train` recipe (configs/passkey_tiny.py): filler 16-90 (N = 90) in 40 x 192.
MAKE_TRAIN = {"data.passkey.train_filler_min": 16, "data.passkey.train_filler_max": 90, "data.seq_len": 192,
              "data.batch_size": 40}
# The curriculum's second stage: filler up to N = 360 tokens, fine-tuned at a lower learning rate.
STAGE2 = {"data.passkey.train_filler_min": 16, "data.passkey.train_filler_max": 360, "data.seq_len": 448,
          "data.batch_size": 8, "train.learning_rate": 5e-4, "train.schedule": "constant"}
# Streaming evaluation at N x 1 .. 64 on fresh examples (seed apart from the training splits').
EVAL = {"multipliers": (1, 2, 4, 8, 16, 32, 64), "examples": 16, "chunk_size": 1024, "batch_size": 16,
        "seed": 1234}
# The eval of the 2026-11-27 N = 90 presets: up to 64x, 64 examples per length, the key anywhere in the filler.
EVAL_64X = {**EVAL, "examples": 64, "key_position": "uniform"}
# The bounded-stream models' overrides (keep_norm FAM, streams of 64 examples), the +5100-step streams model
# that the later stream presets fine-tune, and their constant fine-tuning rate.
STREAMS = {"fam.keep_norm": True, "data.passkey.chain": 64}
STREAMS_5100 = "runs/passkey_bounded_more2/fam_keep_norm_chain64_more2/stage1"
CONSTANT_5E4 = {"train.learning_rate": 5e-4, "train.schedule": "constant"}
# The spec's task (key before the filler) trained with state noise 0.3: the best holder (key_start_noise).
KEY_START_NOISE = {"data.passkey.key_position": "start", "fam.noise": 0.3}
KEY_START_NOISE_03 = "runs/passkey_key_start_noise/fam_key_start_noise_0.3/stage1"
# What most key-at-start presets share: noise 0.3 with drift 0.1 (the best recipe so far), 900 steps from scratch
# on the `make train` data, and the eval to 64x with the key at the start.
KEY_START_DRIFT = {**KEY_START_NOISE, "fam.drift": 0.1}
SCRATCH_900 = [{"steps": 900, **MAKE_TRAIN}]
EVAL_KEY_START = {**EVAL_64X, "key_position": "start"}

PRESETS = {
    # What fits about 30 minutes on the shared 2-core CPU: stage 1 continues the passkey_tiny recipe
    # (filler 16-180), stage 2 fine-tunes on filler up to 360 (N = 360).
    # The FAM model fine-tunes from a finished `make train` run (runs/passkey_tiny, 1500 steps of the
    # passkey_tiny recipe); the BSWA baselines get only the curriculum steps (from scratch): beyond their
    # receptive field they cannot see the key whatever their training, at 1x they are undertrained.
    "tiny": {
        "models": {
            "fam_m0": FAM + ("runs/passkey_tiny",),
            "bswa_m2": (BSWA, {"model.memory_blocks": 2}),
            "bswa_m1": (BSWA, {"model.memory_blocks": 1}),
            "bswa_m0": (BSWA, {"model.memory_blocks": 0}),
        },
        "stages": [
            {"steps": 150},
            {"steps": 100, **STAGE2},
        ],
        "eval": dict(EVAL),
    },
    # More of the last curriculum stage for the FAM model of `tiny` (fine-tunes from its stage 2 workdir,
    # same N = 360): does more training at the same length move the horizon?
    "fam_more": {
        "models": {"fam_m0": FAM + ("runs/passkey_exp/fam_m0/stage2",)},
        "stages": [
            {"steps": 300, **STAGE2},
        ],
        "eval": dict(EVAL),
    },
    # Ablation: the `tiny` FAM curriculum's stage 2 again, from the same stage-1 checkpoint, with random
    # state passing (p 0.8, the paper's) switched on. Compare with `tiny`'s fam_m0 (RSP off).
    "fam_rsp": {
        "models": {"fam_m0_rsp": FAM + ("runs/passkey_exp/fam_m0/stage1",)},
        "stages": [
            {"steps": 100, **STAGE2, "fam.rsp_prob": 0.8},
        ],
        "eval": dict(EVAL),
    },
    # Ablations (issue 6, deliverable 2): the passkey_tiny recipe from scratch for 600 steps, once as the spec
    # has it (no RSP) and once with each switch; N = 180 (the recipe's longest filler). RSP is compared in
    # `rsp_finetune` (from scratch it stops the tiny model from learning, see the spec).
    "ablations": {
        "models": {
            "fam": FAM,
            "fam_no_zero_residual": (FAM[0], {"fam.zero_residual": False}),
            "fam_positions_zero": (FAM[0], {"fam.positions": "zero"}),
            "fam_stop_gradient": (FAM[0], {"fam.stop_gradient": True}),
        },
        "stages": [{"steps": 600}],
        "eval": {**EVAL, "multipliers": (1, 2, 4, 8, 16), "examples": 32},
    },
    # Document-stream training (data.passkey.chain): fine-tunes of the current `make train` model (N = 90)
    # where each row is a stream of 64 examples and the model state runs on across examples and steps, so
    # the FAM is trained after hundreds of updates (each new key must replace the old); the control is the
    # same fine-tune on single examples. 1500 steps, lr 1e-3 on the continued cosine.
    "chain": {
        "models": {
            "fam_ft": (FAM[0], {}, "runs/passkey_tiny"),
            "fam_ft_chain64": (FAM[0], {"data.passkey.chain": 64}, "runs/passkey_tiny"),
        },
        "stages": [{"steps": 1500, "train.learning_rate": 1e-3, **MAKE_TRAIN}],
        "eval": {**EVAL, "multipliers": (1, 2, 4, 8, 16, 32, 64), "examples": 32},
    },
    # Variants of the FAM update that might hold the key longer, each the current `make train` recipe from
    # scratch (900 steps, filler 16-90, N = 90); `fam` is the spec (the control; the `make train` run itself
    # can stand in for it). fam.keep_norm (not in the paper): every update rescales each FAM row to its
    # previous norm, so the recurrence cannot drift outward as fam_drift.py found. (A fam_null_slot model, FAM
    # queries that may read nothing, was here; the option was removed in issue 20, see README.md.)
    # fam_f32: the spec with F = 32 rows instead of 8 (the paper uses 64). fam.noise (training only, not in
    # the paper): Gaussian noise of that std relative to each FAM row's RMS after every update, so the memory
    # must store the key robustly and learn to correct small errors rather than merely hold them. fam_b16: the
    # spec with blocks of 16 tokens, so the same filler is twice as many FAM updates in training and in eval;
    # fam_b8: blocks of 8. *_key_start: trained with the key always at the start of the filler, so every
    # training example spans the whole distance from key to question (with the key anywhere, most distances are
    # short); evaluated like the others, with the key anywhere.
    "variants": {
        "models": {
            "fam": FAM,
            "fam_keep_norm": (FAM[0], {"fam.keep_norm": True}),
            "fam_f32": (FAM[0], {"fam.fam_len": 32}),
            "fam_noise_0.1": (FAM[0], {"fam.noise": 0.1}),
            "fam_noise_0.3": (FAM[0], {"fam.noise": 0.3}),
            "fam_b16": (FAM[0], {"model.block_size": 16}),
            "fam_b8": (FAM[0], {"model.block_size": 8}),
            "fam_key_start": (FAM[0], {"data.passkey.key_position": "start"}),
            "fam_b16_key_start": (FAM[0], {"model.block_size": 16, "data.passkey.key_position": "start"}),
        },
        "stages": SCRATCH_900,
        # the key anywhere in the filler, whatever the model was trained with
        "eval": {**EVAL, "multipliers": (1, 2, 4, 8, 16, 32, 64), "examples": 32, "key_position": "uniform"},
    },
    # The key-at-start model of `variants` (N = 90) fine-tuned on filler up to N = 180, key still at the start,
    # 400 steps; evaluated with the key at the start at multiples of 180.
    "key_start_180": {
        "models": {"fam_key_start_180": (FAM[0], {"data.passkey.key_position": "start"},
                                         "runs/passkey_variants/fam_key_start/stage1")},
        "stages": [{"steps": 400, "data.passkey.train_filler_min": 16, "data.passkey.train_filler_max": 180,
                    "data.seq_len": 288, "data.batch_size": 32, "train.learning_rate": 1e-3}],
        "eval": {**EVAL, "multipliers": (1, 2, 4, 8, 16), "examples": 64, "key_position": "start"},
    },
    # A longer curriculum (the prototype's direction): the `make train` model (N = 90) fine-tuned in four
    # stages up to N = 4096 filler tokens (~128 FAM updates between key and question at most, against ~3 at
    # N = 90), ~8k tokens per step throughout (8000 training examples per long stage: enough for 200 steps,
    # and quick to prepare). Does the extrapolation ratio grow with the trained horizon?
    "long": {
        "models": {"fam_long": (FAM[0], {}, "runs/passkey_tiny")},
        "stages": [
            {"steps": 200, "data.passkey.train_filler_max": 360, "data.seq_len": 448, "data.batch_size": 16,
             "train.learning_rate": 1e-3, "train.schedule": "constant"},
            {"steps": 200, "data.passkey.train_filler_max": 1024, "data.seq_len": 1120, "data.batch_size": 8,
             "train.learning_rate": 5e-4, "data.passkey.train_examples": 8000},
            {"steps": 200, "data.passkey.train_filler_max": 2048, "data.seq_len": 2144, "data.batch_size": 4},
            {"steps": 200, "data.passkey.train_filler_max": 4096, "data.seq_len": 4192, "data.batch_size": 2},
        ],
        "eval": {**EVAL, "multipliers": (1, 2, 4, 8, 16), "examples": 32},
    },
    # A bounded state trained in its stationary regime: the keep_norm model of `variants` (N = 90) fine-tuned
    # with document streams (chain 64) or with random state passing (p 0.8). Without keep_norm, streams and
    # RSP showed the model states whose norm grows with every update (a moving target); with it the state
    # stays on a sphere, so a long chain's state is what a long eval meets. 600 steps, lr 1e-3 continued.
    "bounded_stream": {
        "models": {
            "fam_keep_norm_chain64": (FAM[0], STREAMS,
                                      "runs/passkey_variants/fam_keep_norm/stage1"),
            "fam_keep_norm_rsp_0.8": (FAM[0], {"fam.keep_norm": True, "fam.rsp_prob": 0.8},
                                      "runs/passkey_variants/fam_keep_norm/stage1"),
            # the control: the same fine-tune on single examples
            "fam_keep_norm_ft": (FAM[0], {"fam.keep_norm": True}, "runs/passkey_variants/fam_keep_norm/stage1"),
        },
        "stages": [{"steps": 600, "train.learning_rate": 1e-3, **MAKE_TRAIN}],
        "eval": dict(EVAL_64X),
    },
    # bounded_stream's chain64 model trained 1500 steps more on streams (same data, lr 1e-3
    # peak on the continued cosine):
    # does more training lift every length, or only the short ones?
    "bounded_stream_more": {
        "models": {"fam_keep_norm_chain64_more": (FAM[0], STREAMS,
                                                  "runs/passkey_bounded/fam_keep_norm_chain64/stage1"),
                   # the control: bounded_stream's single-example fine-tune, 1500 steps more
                   "fam_keep_norm_ft_more": (FAM[0], {"fam.keep_norm": True},
                                             "runs/passkey_bounded/fam_keep_norm_ft/stage1")},
        "stages": [{"steps": 1500, "train.learning_rate": 1e-3, **MAKE_TRAIN}],
        "eval": dict(EVAL_64X),
    },
    # bounded_stream_more's model, 3000 steps more on streams (continued cosine): does the curve keep rising?
    "bounded_stream_more2": {
        "models": {"fam_keep_norm_chain64_more2": (FAM[0], STREAMS,
                                                   "runs/passkey_bounded_more/fam_keep_norm_chain64_more/stage1")},
        "stages": [{"steps": 3000, "train.learning_rate": 1e-3, **MAKE_TRAIN}],
        "eval": dict(EVAL_64X),
    },
    # bounded_stream_more2's model (it writes keys into aged FAMs) fine-tuned 1500 steps more on streams with
    # state noise 0.3 (the variant that held a key at the start longest): can it also hold longer?
    "bounded_stream_noise": {
        "models": {"fam_keep_norm_chain64_noise_0.3": (FAM[0], {**STREAMS, "fam.noise": 0.3}, STREAMS_5100)},
        "stages": [{"steps": 1500, "train.learning_rate": 1e-3, **MAKE_TRAIN}],
        "eval": dict(EVAL_64X),
    },
    # Truncated BPTT beyond the gradient window: bounded_stream_more2's model (N = 90) fine-tuned on streams of
    # examples with filler up to 180 tokens, still in 192-token steps, so a key asked a step after it was
    # written gets its loss with no gradient to the write (lr 5e-4 constant, as STAGE2). Does the hold then
    # grow past 2x N?
    "stream_n180": {
        "models": {"fam_keep_norm_chain64_n180": (FAM[0], STREAMS, STREAMS_5100)},
        "stages": [{"steps": 900, **MAKE_TRAIN, "data.passkey.train_filler_max": 180, **CONSTANT_5E4}],
        "eval": dict(EVAL_64X),
    },
    # stream_n180 with 4x the gradient window: 768-token steps (batch 10, the same tokens per step), so the
    # gradient reaches a key written up to 24 blocks back. Is the hold set by the window or by N?
    "stream_n180_w768": {
        "models": {"fam_keep_norm_chain64_n180_w768": (FAM[0], STREAMS, STREAMS_5100)},
        "stages": [{"steps": 900, **MAKE_TRAIN, "data.passkey.train_filler_max": 180, "data.seq_len": 768,
                    "data.batch_size": 10, **CONSTANT_5E4}],
        "eval": dict(EVAL_64X),
    },
    # bounded_stream_more2's model fine-tuned on streams whose examples all put the key at the start of their
    # filler: every answer then needs the key held over its whole filler (what made the single-example models
    # the best holders), and each key is still written into a FAM aged by the stream.
    "stream_key_first": {
        "models": {"fam_keep_norm_chain64_key_first": (FAM[0], {**STREAMS, "data.passkey.key_position": "start"},
                                                       STREAMS_5100)},
        "stages": [{"steps": 1500, **MAKE_TRAIN, **CONSTANT_5E4}],
        "eval": dict(EVAL_64X),
    },
    # The best holder (the `variants` model trained with the key at the start: 100 / 100 / 62 / 5% at 1x-8x)
    # trained again with state noise 0.3, the best holder among the key-anywhere variants, alone and with
    # keep_norm: does a readout made robust to perturbed FAMs hold past 4x? Same 900 steps from scratch;
    # key_start_noise_start evaluates with the key at the start (holding), this one with the key anywhere.
    "key_start_noise": {
        "models": {
            "fam_key_start_noise_0.3": (FAM[0], KEY_START_NOISE),
            "fam_key_start_noise_0.3_keep_norm": (FAM[0], {**KEY_START_NOISE, "fam.keep_norm": True}),
            # the noise 0.3 model again with another init seed (and shuffle seed): is its hold a property of the
            # recipe or of one run?
            "fam_key_start_noise_0.3_seed1": (FAM[0], {**KEY_START_NOISE, "train.seed": 1, "data.seed": 1}),
        },
        "stages": SCRATCH_900,
        "eval": dict(EVAL_64X),
    },
    # key_start_noise found that noise lengthens the hold of key-at-start training (0.3: 91% at 8x). Stronger
    # noise, same 900 steps from scratch (0.6 did not learn the task in them; 1.0 was not run).
    "key_start_noise_more": {
        "models": {
            "fam_key_start_noise_0.6": (FAM[0], {"data.passkey.key_position": "start", "fam.noise": 0.6}),
        },
        "stages": SCRATCH_900,
        "eval": dict(EVAL_64X),
    },
    # key_start_noise's noise 0.3 model, 900 steps more on the same data (lr 1e-3 constant): does the hold
    # keep growing with training?
    "key_start_noise_longer": {
        "models": {"fam_key_start_noise_0.3_longer": (
            FAM[0], KEY_START_NOISE, KEY_START_NOISE_03)},
        "stages": [{"steps": 900, **MAKE_TRAIN, "train.learning_rate": 1e-3, "train.schedule": "constant"}],
        "eval": dict(EVAL_64X),
    },
    # key_start_noise's recipe (noise 0.3: 91% at 8x, 20% at 16x) varied two ways, each 900 steps from scratch:
    # noise 0.45 (between 0.3 and 0.6, which did not learn); F = 32 FAM rows instead of 8 (more room to store the
    # key redundantly). Evaluated with the key at the start (the spec's task).
    "key_start_noise_sweep": {
        "models": {
            "fam_key_start_noise_0.45": (FAM[0], {**KEY_START_NOISE, "fam.noise": 0.45}),
            "fam_key_start_noise_0.3_f32": (FAM[0], {**KEY_START_NOISE, "fam.fam_len": 32}),
        },
        "stages": SCRATCH_900,
        "eval": EVAL_KEY_START,
    },
    # key_start_noise's recipe on filler 60-90 instead of 16-90: the same N, but every example holds the key
    # over most of N (its first try, inside key_start_noise_sweep, lost the filler to the stage).
    "key_start_noise_min60": {
        "models": {"fam_key_start_noise_0.3_min60": (FAM[0], KEY_START_NOISE)},
        "stages": [{"steps": 900, **MAKE_TRAIN, "data.passkey.train_filler_min": 60}],
        "eval": EVAL_KEY_START,
    },
    # A noise ramp: key_start_noise's noise 0.3 model (seed 0) fine-tuned with noise 0.5 for 900 steps at lr 5e-4
    # constant (0.6 from scratch did not learn; from a model that already holds, it may).
    "key_start_noise_ramp": {
        "models": {"fam_key_start_noise_0.3_to_0.5": (FAM[0], {**KEY_START_NOISE, "fam.noise": 0.5},
                                                       KEY_START_NOISE_03)},
        "stages": [{"steps": 900, **MAKE_TRAIN, **CONSTANT_5E4}],
        "eval": EVAL_KEY_START,
    },
    # Random state passing (the paper's RSP) on the spec's task: key_start_noise's noise 0.3 model fine-tuned
    # with rsp_prob 0.9 (a step starts from the previous step's final FAM 90% of the time) or 0.5, noise and
    # key at the start kept, 900 steps at lr 5e-4 constant. fam_probe.py found that model's FAM still holds the
    # key at 32x (a linear probe fitted there reads 100% of the digits) while its own readout fails: the part of
    # the FAM shared by all prompts drifts with every update into states no training example showed. RSP shows
    # the readout such aged states (each example still has at most N filler; the FAM it starts from may be
    # many steps old).
    "key_start_noise_rsp": {
        "models": {
            "fam_key_start_noise_0.3_rsp_0.9": (FAM[0], {**KEY_START_NOISE, "fam.rsp_prob": 0.9},
                                                KEY_START_NOISE_03),
            "fam_key_start_noise_0.3_rsp_0.5": (FAM[0], {**KEY_START_NOISE, "fam.rsp_prob": 0.5},
                                                KEY_START_NOISE_03),
        },
        "stages": [{"steps": 900, **MAKE_TRAIN, **CONSTANT_5E4}],
        "eval": EVAL_KEY_START,
    },
    # key_start_noise's recipe at N = 180 (filler 16-180 in 27 rows of 288 tokens, about the same tokens per
    # step), 900 steps from scratch: does the hold scale with N (16x = 2880 filler tokens)?
    "key_start_noise_n180": {
        "models": {"fam_key_start_noise_0.3_n180": (FAM[0], KEY_START_NOISE)},
        "stages": [{"steps": 900, **MAKE_TRAIN, "data.passkey.train_filler_max": 180, "data.seq_len": 288,
                    "data.batch_size": 27}],
        "eval": {**EVAL_64X, "multipliers": (1, 2, 4, 8, 16, 32), "key_position": "start"},
    },
    # Persistent noise (fam.drift, training only, not in the paper): fam_probe.py found that what ages in the
    # FAM is a slow drift shared by all prompts. With fam.drift s each training row adds one random direction
    # (std s x the FAM row's RMS) after every block, so it accumulates like that drift and the readout must
    # learn to ignore a drifted FAM. key_start_noise's recipe (noise 0.3 kept) with drift 0.1 and 0.2, 900
    # steps from scratch.
    "key_start_drift": {
        "models": {
            "fam_key_start_noise_0.3_drift_0.1": (FAM[0], KEY_START_DRIFT),
            "fam_key_start_noise_0.3_drift_0.2": (FAM[0], {**KEY_START_NOISE, "fam.drift": 0.2}),
            # drift 0.2 again with init and shuffle seed 1 (`--models=fam_key_start_noise_0.3_drift_0.2_seed1`)
            "fam_key_start_noise_0.3_drift_0.2_seed1": (FAM[0], {**KEY_START_NOISE, "fam.drift": 0.2,
                                                                 "train.seed": 1, "data.seed": 1}),
            # and drift 0.1 with seed 1 (`--models=fam_key_start_noise_0.3_drift_0.1_seed1`)
            "fam_key_start_noise_0.3_drift_0.1_seed1": (FAM[0], {**KEY_START_DRIFT, "train.seed": 1, "data.seed": 1}),
        },
        "stages": SCRATCH_900,
        "eval": EVAL_KEY_START,
    },
    # key_start_drift's drift 0.2 model (the flattest curve: 80% at 1x, 48% at 16x, 28% at 64x) fine-tuned 900
    # steps more at lr 1e-3 constant (drift and noise kept). (Its second model, drift 0.2 with fam.null_slot,
    # was removed with that option in issue 20.)
    "key_start_drift_more": {
        "models": {
            "fam_key_start_noise_0.3_drift_0.2_more": (
                FAM[0], {**KEY_START_NOISE, "fam.drift": 0.2, "train.learning_rate": 1e-3,
                         "train.schedule": "constant"},
                "runs/passkey_ks_drift/fam_key_start_noise_0.3_drift_0.2/stage1"),
        },
        "stages": SCRATCH_900,
        "eval": EVAL_KEY_START,
    },
    # Blocks of 64 tokens instead of 32: the hold looked like a count of FAM updates (about 23 held, see the
    # N = 180 run), and B = 64 halves the updates per token, in training (1-2 between key and question) and at
    # test. key_start_noise's recipe (noise 0.3) alone and with drift 0.1, 900 steps from scratch.
    "key_start_b64": {
        "models": {
            "fam_key_start_noise_0.3_b64": (FAM[0], {**KEY_START_NOISE, "model.block_size": 64}),
            "fam_key_start_noise_0.3_drift_0.1_b64": (FAM[0], {**KEY_START_DRIFT, "model.block_size": 64}),
        },
        "stages": SCRATCH_900,
        "eval": EVAL_KEY_START,
    },
    # Smaller blocks on the drift 0.1 recipe (tenth session): if the FAM's direction settles like that of
    # a + t g (a fixed start plus a steady update g per block), the change a reader must bridge between t_train
    # and 16 t_train shrinks like 1 / t_train, and B = 16 or 8 gives 2 or 4 x the updates in training. Fits
    # what B = 64 (fewer updates) and N = 45 showed; 900 steps from scratch. Only B = 16 has a result
    # (benchmarks/RESULTS.md: not learned, 25% at 1x); the B = 8 run was stopped at step 100 (about an hour of
    # training here), so `--models=..._b8` is untested.
    "key_start_small_blocks": {
        "models": {f"fam_key_start_noise_0.3_drift_0.1_b{b}": (
            FAM[0], {**KEY_START_DRIFT, "model.block_size": b}) for b in (16, 8)},
        "stages": SCRATCH_900,
        "eval": EVAL_KEY_START,
    },
    # A shorter training length: every model above loses the key somewhere between 720 and 1440 filler
    # tokens, whether N was 90 or 180. If that hold is a property of the model and not a multiple of N, a
    # model trained on filler 16-45 (N = 45, examples of 85-114 tokens in 60 x 128 rows, the same tokens per
    # step) should reach further in multiples of its N. key_start_drift's drift 0.1 recipe, 900 steps from
    # scratch; the eval goes to 128x so that its tokens overlap the N = 90 tables.
    "key_start_n45": {
        "models": {
            "fam_key_start_noise_0.3_drift_0.1_n45": (FAM[0], KEY_START_DRIFT),
            "fam_key_start_noise_0.3_drift_0.1_n45_seed1": (FAM[0], {**KEY_START_DRIFT, "train.seed": 1,
                                                                     "data.seed": 1}),
        },
        "stages": [{"steps": 900, **MAKE_TRAIN, "data.passkey.train_filler_max": 45, "data.seq_len": 128,
                    "data.batch_size": 60}],
        "eval": {**EVAL_64X, "multipliers": (1, 2, 4, 8, 16, 32, 64, 128), "key_position": "start"},
    },
    # A wider model: d 256 (4 heads of 64, FFN 1024) instead of d 128, on key_start_drift's drift 0.1 recipe
    # (N = 90), 900 steps from scratch at lr 2e-3 (3e-3 is the d 128 rate). Does a bigger reader hold longer?
    "key_start_d256": {
        "models": {"fam_key_start_noise_0.3_drift_0.1_d256": (
            FAM[0], {**KEY_START_DRIFT, "model.d_model": 256, "model.mlp_dim": 1024,
                     "train.learning_rate": 2e-3})},
        "stages": SCRATCH_900,
        "eval": EVAL_KEY_START,
    },
    # A deeper model: 3 layers instead of 2 (one more FAM), on key_start_drift's drift 0.1 recipe (N = 90),
    # 900 steps from scratch.
    "key_start_l3": {
        "models": {"fam_key_start_noise_0.3_drift_0.1_l3": (
            FAM[0], {**KEY_START_DRIFT, "model.num_layers": 3})},
        "stages": SCRATCH_900,
        "eval": EVAL_KEY_START,
    },
    # The whole bounded-stream recipe in one command, from scratch (what bounded_stream -> _more -> _more2 ran
    # in pieces): the `make train` recipe with fam.keep_norm (900 steps), then document streams of 64 examples
    # at peak lr 1e-3 for 600, 1500 and 3000 steps (each stage follows its part of one cosine over the
    # cumulative step count, ending at 1e-4).
    # 42 min of training on the 2-core CPU (2026-11-27); the final weights are bit-identical to the pieces'.
    "stream_recipe": {
        "models": {"fam_keep_norm_stream": (FAM[0], {"fam.keep_norm": True})},
        "stages": [
            {"steps": 900, **MAKE_TRAIN},
            {"steps": 600, "data.passkey.chain": 64, "train.learning_rate": 1e-3},
            {"steps": 1500},
            {"steps": 3000},
        ],
        "eval": dict(EVAL_64X),
    },
    # Random state passing as a fine-tune of the finished `make train` model (runs/passkey_tiny), with an
    # equal fine-tune without RSP as the control; same data (N = 180), lr 1e-3 constant.
    "rsp_finetune": {
        "models": {
            "fam_ft": FAM + ("runs/passkey_tiny",),
            "fam_ft_rsp_0.5": (FAM[0], {"fam.rsp_prob": 0.5}, "runs/passkey_tiny"),
            # long state chains: a step starts from the previous step's final FAM 95% of the time
            "fam_ft_rsp_0.95": (FAM[0], {"fam.rsp_prob": 0.95}, "runs/passkey_tiny"),
        },
        "stages": [{"steps": 500, "train.learning_rate": 1e-3, "train.schedule": "constant"}],
        "eval": {**EVAL, "multipliers": (1, 2, 4, 8, 16), "examples": 32},
    },
    # Seconds-long smoke test of the whole pipeline (nothing is learned).
    "smoke": {
        "models": {"fam_m0": FAM, "bswa_m1": (BSWA, {"model.memory_blocks": 1})},
        "stages": [
            {"steps": 4, "data.passkey.train_examples": 200},
            {"steps": 2, "data.passkey.train_filler_max": 360, "data.seq_len": 448, "data.batch_size": 4,
             "data.passkey.train_examples": 200},
        ],
        "eval": {"multipliers": (1, 2, 4), "examples": 2, "chunk_size": 512, "batch_size": 2, "seed": 1234},
    },
}


def stage_options(overrides: dict, stages: list[dict], k: int) -> dict:
    """Returns the config overrides of stage k (1-based) of a model: COMMON, then the model's overrides, then
    stages 1..k in order (a stage inherits what earlier stages set unless it sets it), without "steps"."""
    opts = {**COMMON, **overrides}
    for st in stages[:k]:
        opts.update({key: v for key, v in st.items() if key != "steps"})
    return opts


def key_at_start(preset: dict) -> dict:
    """The same preset (models, stages) evaluated with the key always at the start of the filler: every prompt
    then spans the whole distance from key to question (holding only, no writing into an aged FAM)."""
    return {**preset, "eval": {**preset["eval"], "key_position": "start"}}


# The same models evaluated with the key at the start (the spec's task): with the base preset's --out, a
# *_start preset reuses its trained stages (or trains them) and writes passkey*_key_start.* beside its table.
for _name in ("variants", "bounded_stream_more2", "bounded_stream_noise", "stream_n180",
              "stream_n180_w768", "stream_key_first", "key_start_noise", "key_start_noise_more",
              "key_start_noise_longer"):
    PRESETS[_name + "_start"] = key_at_start(PRESETS[_name])
