"""Compiler-aware architecture search (CANAO): search space, latency oracle, supernet,
distillation, controllers and the search loop. Talks to the compiler only through
oracle.py (LatencyOracle, compile_final, verify_artifact, per_question_latency).

    space.py       Arch (per-layer heads/FFN, seq, precision) and the SearchSpace bounded by the teacher
    importance.py  head/neuron importance (Taylor) and reordering of the teacher (same function)
    supernet.py    SuperNet: run any sub-network on slices of one weight set; extract() == slicing
    oracle.py      LatencyOracle (compile + time here or on a device, JSON database); the final
                   model through the compiler (compile, verify against PyTorch, per-question timing)
    predictor.py   LatencyPredictor (per precision: per-layer FLOP costs + per-choice corrections of
                   the median, p95 by a fitted ratio; held-out error, recalibration), calibration set
    distill.py     losses (logit KL, hidden MSE, attention KL), phase 1 (sandwich) and phase 2
                   (intermediate, then prediction), resumable, optional time budgets
    controllers.py LSTM REINFORCE (moving baseline), regularized evolution, random
    search.py      Evaluator (sub-network F1 on a dev slice), reward, constraints, the measured
                   confirmation that gives the latency guarantee, impossible-budget check
    pipeline.py    the stages of `canao search`, recorded in OUT/state.json (--resume)
    report.py      Pareto PNG and report.md
    command.py     the CLI

Training can run on a GPU machine and the device stages on the target:
scripts/device_search.sh runs the pipeline with measure=False and a predictor fitted on the
target; `canao search ... --resume` on the returned folder measures, compiles, verifies and
reports there (see docs/results/search-40ms/README.md).
"""
