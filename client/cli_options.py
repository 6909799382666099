"""The options of ``cxr-fl-client``'s commands, declared once (typer ``Annotated`` aliases).

A command's signature then takes one line per option (``data: DataPath = None``); an option that
two commands share is the same alias, and so has the same name and help in both.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

# the data a command reads

CheckFormat = Annotated[
    str,
    typer.Option(
        "--format",
        help="Source format: image-folder, covid19-radiography, ieee8023, nih14, chexpert, medmnist, "
        "manifest, dicom, synthetic.",
    ),
]
DataFormat = Annotated[str, typer.Option("--format", help="Source format of --data (see `check --help`).")]
DataPath = Annotated[
    Path | None, typer.Option("--data", help="The site's data folder or file (not needed for synthetic).")
]
LabelledData = Annotated[Path | None, typer.Option("--data", help="The site's labelled data folder or file.")]
LabelTask = Annotated[str, typer.Option("--task", help="Task whose classes the labels map onto.")]
CacheImageSize = Annotated[int, typer.Option("--image-size", help="Cache size in pixels (square).")]
Strict = Annotated[bool, typer.Option("--strict", help="Fail on the first unreadable image.")]
SourceOptions = Annotated[
    list[str] | None,
    typer.Option("--option", "-o", help="Source option KEY=VALUE (repeatable), e.g. drop-unmapped=true."),
]
LabelledSourceOptions = Annotated[
    list[str] | None,
    typer.Option("--option", "-o", help="Source option KEY=VALUE (repeatable), e.g. label-map=..."),
]
CacheDir = Annotated[
    Path | None,
    typer.Option("--cache-dir", help="Image cache folder (default $CXR_FL_CACHE_DIR or ~/.cache)."),
]

# the site's policy: its limits (common/site_limits.py)

MaxImageSize = Annotated[
    int | None,
    typer.Option(
        "--max-image-size", help="Site policy: the largest image side a run may ask for (default 256)."
    ),
]
MaxLocalEpochs = Annotated[
    int | None,
    typer.Option("--max-local-epochs", help="Site policy: most local epochs per message (default 10)."),
]
MaxKdEpochs = Annotated[
    int | None,
    typer.Option("--max-kd-epochs", help="Site policy: most KD epochs per message (default 20)."),
]
MaxRounds = Annotated[
    int | None,
    typer.Option("--max-rounds", help="Site policy: most rounds (of each kind) per run (default 100)."),
]
MaxTeacherParameters = Annotated[
    int | None,
    typer.Option(
        "--max-teacher-parameters",
        help="Site policy: largest teacher or student, in parameters (default 60M).",
    ),
]
Phases = Annotated[
    str | None,
    typer.Option(
        "--phases",
        help="Site policy: the run phases this site takes part in, of teacher, distill, federated-student "
        "(default all; a run with another phase is declined).",
    ),
]
PolicyOption = Annotated[
    Path | None,
    typer.Option(
        "--policy",
        help="The site's policy file (written by `init`): its limits tighten the --max-* options, and "
        "its cache-max-age-days and dp-target-epsilon apply.",
    ),
]

# what the site's replies may carry (client/disclosure.py)

SharePerClassMetrics = Annotated[
    bool,
    typer.Option(
        "--share-per-class-metrics",
        help="Also send accuracy, F1 and per-class metrics (rounded; they reveal class shares).",
    ),
]
ShareExactMetrics = Annotated[
    bool,
    typer.Option(
        "--share-exact-metrics",
        help="Send every figure, count and error text at full precision instead of rounded to 2 "
        "significant digits (research federations; a crafted model can then read class counts).",
    ),
]

# the site's operating point (common/operating_point.py)

OperatingPointCriterion = Annotated[
    str,
    typer.Option(
        "--operating-point",
        help="How this site sets the decision rule of every model it keeps, on its own validation "
        "split: balanced-accuracy (default), argmax (the model's own rule), or "
        "sensitivity:CLASS=X[,CLASS=Y] (balanced accuracy, then at least sensitivity X for CLASS). "
        "The site's choice; the rule stays at the site.",
    ),
]
IgnoreOperatingPoint = Annotated[
    bool,
    typer.Option(
        "--ignore-operating-point",
        help="Decide by the plain argmax (0.5 per finding), not by the site's operating point that "
        "the exported model carries.",
    ),
]

# evaluate

EvaluatedModel = Annotated[
    Path,
    typer.Argument(
        help="Exported student (.onnx with its .preprocessing.json, or .pt with its .json), a site's "
        "student folder, or a coordinator checkpoint (RUN_DIR/checkpoints/best.pt).",
    ),
]
EvaluationOut = Annotated[
    Path, typer.Option("--out", help="Folder for evaluation.md/.json and the PNG figures.")
]
EvaluationTask = Annotated[
    str | None,
    typer.Option("--task", help="Task the data is labelled for (default: the model's; must match it)."),
]
Bootstrap = Annotated[
    int, typer.Option("--bootstrap", help="Bootstrap resamples for the 95% confidence intervals.")
]
BootstrapSeed = Annotated[int, typer.Option("--seed", help="Seed of the bootstrap resampling.")]
Threshold = Annotated[
    float | None,
    typer.Option(
        "--threshold",
        min=0.0,
        max=1.0,
        help="Site-chosen probability threshold for every class (replaces the operating point).",
    ),
]
ClassThresholds = Annotated[
    list[str] | None,
    typer.Option("--class-threshold", help="Site-chosen threshold of one class, CLASS=P (repeatable)."),
]
CalibrationBins = Annotated[
    int, typer.Option("--bins", min=2, help="Calibration bins (ECE, reliability diagram).")
]
InferenceThreads = Annotated[int, typer.Option("--threads", min=1, help="Inference threads.")]

# start and serve: how the site joins

ServerAddress = Annotated[str, typer.Option("--server", help="The coordinator's SuperLink, HOST:PORT.")]
SiteName = Annotated[str, typer.Option("--site", help="This site's name (as registered).")]
SiteOut = Annotated[Path, typer.Option("--out", help="Folder for the student, model card and logs.")]
CaCert = Annotated[
    Path | None, typer.Option("--ca", help="The coordinator's CA certificate (ca.crt) for TLS.")
]
SiteKey = Annotated[Path | None, typer.Option("--key", help="This site's private key (SITE.key).")]
Insecure = Annotated[
    bool, typer.Option("--insecure", help="No TLS, no site authentication (tests on a trusted machine).")
]
TrainThreads = Annotated[int, typer.Option("--threads", help="CPU threads for local training.")]
Device = Annotated[
    str,
    typer.Option(
        "--device",
        help="Where this site trains: auto (a CUDA GPU when present, else the CPU), cpu, cuda or "
        "cuda:N. The site decides; the server cannot change it.",
    ),
]
CheckTask = Annotated[str, typer.Option("--task", help="Task of the data check.")]
CheckImageSize = Annotated[
    int,
    typer.Option(
        "--image-size",
        help="Image size of the data check. Give the run's image-size (the coordinator announces it): "
        "the images are then decoded once, here, and the run reuses that cache.",
    ),
]
SkipCheck = Annotated[bool, typer.Option("--skip-check", help="Do not check the data first.")]
ConnectTimeout = Annotated[
    float, typer.Option("--connect-timeout", help="Give up if unreachable this long (s).")
]
ReconnectTimeout = Annotated[
    float,
    typer.Option("--reconnect-timeout", help="Once joined, give up after the server is gone this long (s)."),
]
ActivateTimeout = Annotated[
    float,
    typer.Option(
        "--activate-timeout",
        help="Keep asking the server to activate this site this long (s): after a crash, the "
        "previous session counts as online for up to 60 s.",
    ),
]
AllowApp = Annotated[
    list[str] | None,
    typer.Option(
        "--allow-app",
        help="Also run this app (its FAB SHA-256, repeatable). By default a site runs only the app "
        "that its own installed cxr-fl builds (`cxr-fl-client app-hash` prints its hash).",
    ),
]
SupernodeMemory = Annotated[
    float,
    typer.Option(
        "--supernode-memory",
        help="Bound of the SuperNode's memory in GiB (0: none). The SuperNode unpacks each run's "
        "app bundle before the app allow-list sees it: a zip bomb then fails the SuperNode, which "
        "is restarted, not the machine.",
    ),
]
InitialTeacherSha256 = Annotated[
    str | None,
    typer.Option(
        "--initial-teacher-sha256",
        help="Train only in a federation that starts from this initial teacher (its weights hash, "
        "as the coordinator's `start --initial-teacher` prints it): round 1 is refused otherwise.",
    ),
]
InitialTeacher = Annotated[
    Path | None,
    typer.Option(
        "--initial-teacher",
        help="A weights file this site was given and checked: the federation must start from the "
        "teacher the run builds from it (round 1 is refused otherwise).",
    ),
]

# start and serve: the site's privacy (client/site_privacy.py)

Epsilon = Annotated[
    float | None, typer.Option("--epsilon", help="This site's DP budget (may only tighten the server's).")
]
Delta = Annotated[
    float | None,
    typer.Option("--delta", help="This site's DP delta (default: 1e-5, at most 1/training images)."),
]
MaxGradNorm = Annotated[float | None, typer.Option("--max-grad-norm", help="This site's DP clipping norm.")]
Accountant = Annotated[
    str | None, typer.Option("--accountant", help="This site's DP accountant: rdp (default), prv, gdp.")
]
PrivacyLedgerPath = Annotated[
    Path | None,
    typer.Option(
        "--privacy-ledger",
        help="The site's privacy ledger file (default: STATE_DIR/privacy/ledger.json, site-wide, "
        "whatever --out says).",
    ),
]
StateDir = Annotated[
    Path | None,
    typer.Option(
        "--state-dir",
        help="The site's state folder: privacy ledger and its counter (default: $CXR_FL_STATE_DIR, "
        "else $XDG_STATE_HOME/cxr-fl, else ~/.local/state/cxr-fl).",
    ),
]
ShareDeliveredStudent = Annotated[
    bool,
    typer.Option(
        "--share-delivered-student",
        help="Send this site's delivered student (ONNX) when a run asks for the cross-site matrix "
        "(cross-site-matrix), to be scored at the other sites; never under DP.",
    ),
]

# init

KitFolder = Annotated[Path, typer.Argument(help="The kit folder from the coordinator (`cxr-fl-server kit`).")]
SiteFolder = Annotated[
    Path, typer.Option("--site-dir", help="This site's folder: its key pair, policy, state and outputs.")
]
InitImageSize = Annotated[
    int, typer.Option("--image-size", help="Image size of the data check (the runs' image-size).")
]
CacheMaxAgeDays = Annotated[
    int | None, typer.Option("--cache-max-age-days", help="Keep decoded images at most this many days.")
]
PolicyEpsilon = Annotated[
    float | None,
    typer.Option("--epsilon", help="This site's DP budget (the policy's dp-target-epsilon)."),
]
