"""``prelabel``: run the service (serve, gateway, triton, trainer) or use it (predict, finetune, jobs, models).

Flags override the ``PRELABEL_*`` environment variables of :class:`prelabel.settings.Settings`.
"""

from __future__ import annotations

import argparse
import errno
import os
import sqlite3
import sys
from pathlib import Path

import grpc

from prelabel.errors import PrelabelError, volume_full
from prelabel.settings import Settings
from prelabel.spec import AUTO, DEFAULT_TARGET_PRECISION, SCRATCH_TRIAL, STRATEGIES, short_name

LABEL_STUDIO_HELP = """Run Label Studio's ML backend in front of a Prelabel gateway (a gRPC client, like predict).

Connect it to a project: in Label Studio, Settings > Model > Connect Model, URL http://HOST:9090;
or through its API: POST /api/ml {"url": "http://HOST:9090", "project": ID}. With --basic-auth,
choose "basic auth" there and give the same user and password (the adapter then gives the webhook
that connecting creates the same header itself). Label Studio must allow the
backend's address: ML_BLOCK_LOCAL_IP=false and SSRF_PROTECTION_ENABLED=false for a backend on a
loopback or private address. See docs/labelstudio.md.
"""


def _service_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data-dir", type=Path, help="where models, logs and data live (PRELABEL_DATA_DIR)")
    parser.add_argument("--model-repository", type=Path, help="Triton model repository (default DATA_DIR/models)")
    parser.add_argument("--log-level", help="DEBUG, INFO, WARNING (PRELABEL_LOG_LEVEL)")


def _gateway_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--grpc-host", help="address to listen on (PRELABEL_GRPC_HOST, default 127.0.0.1)")
    parser.add_argument("--grpc-port", type=int, help="gRPC port, 0 for a free one (PRELABEL_GRPC_PORT, default 50051)")
    parser.add_argument(
        "--metrics-port", type=int, help="Prometheus port, 0 free, -1 off (PRELABEL_METRICS_PORT, 9400)"
    )
    parser.add_argument(
        "--gateway-workers", type=int,
        help="gateway processes sharing the gRPC port, for GPU machines (PRELABEL_GATEWAY_WORKERS, default 1)",
    )  # fmt: skip


def _client_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--server", default=None, help="gateway address HOST:PORT (default 127.0.0.1:PRELABEL_GRPC_PORT)"
    )
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for the gateway and each call")
    parser.add_argument("--token", help="bearer token (PRELABEL_TOKEN)")
    parser.add_argument("--ca-cert", type=Path, help="CA to trust: use TLS (PRELABEL_CA_CERT)")
    parser.add_argument("--client-cert", type=Path, help="for mutual TLS (PRELABEL_CLIENT_CERT)")
    parser.add_argument("--client-key", type=Path, help="for mutual TLS (PRELABEL_CLIENT_KEY)")


def _training_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--strategy", default=short_name(AUTO), choices=[short_name(s) for s in STRATEGIES])
    parser.add_argument("--freeze-first-k", type=int, default=0, help="stages to freeze (default: half)")
    parser.add_argument("--epochs", type=int, default=0, help="default: the strategy's")
    parser.add_argument("--learning-rate", type=float, default=0.0, help="the head's; default: the strategy's")
    parser.add_argument("--target-precision", type=float, default=DEFAULT_TARGET_PRECISION,
                        help="precision that auto-accept must reach")  # fmt: skip


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(
        prog="prelabel", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = root.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run everything on this machine: embedded Triton and the gateway")
    _service_flags(serve)
    _gateway_flags(serve)
    serve.add_argument("--triton-url", help="use this Triton HOST:PORT instead of starting one")

    gateway = commands.add_parser("gateway", help="run the gRPC gateway against an external Triton")
    _service_flags(gateway)
    _gateway_flags(gateway)
    gateway.add_argument("--triton-url", help="Triton gRPC address HOST:PORT (PRELABEL_TRITON_URL)")

    triton = commands.add_parser("triton", help="run the embedded Triton alone on the model repository")
    _service_flags(triton)
    triton.add_argument("--host", dest="triton_host", help="address Triton listens on (PRELABEL_TRITON_HOST)")
    triton.add_argument("--grpc-port", dest="triton_grpc_port", type=int, help="Triton gRPC port (0: free)")
    triton.add_argument("--http-port", dest="triton_http_port", type=int, help="Triton HTTP port (0: free)")
    triton.add_argument("--metrics-port", dest="triton_metrics_port", type=int, help="Triton metrics port (0: free)")

    trainer = commands.add_parser("trainer", help="run a trainer worker: take fine-tune jobs from the queue")
    _service_flags(trainer)
    trainer.add_argument("--queue-url", help="sqlite:///PATH or redis://HOST:PORT/DB (PRELABEL_QUEUE_URL)")
    trainer.add_argument("--triton-url", help="Triton to load new versions into (PRELABEL_TRITON_URL)")
    trainer.add_argument("--metrics-port", type=int, help="Prometheus port, 0 free, -1 off (PRELABEL_METRICS_PORT)")

    predict = commands.add_parser(
        "predict",
        help="pre-label image files and folders; one JSON line per image",
        epilog="exit status: 0 every image was pre-labeled; 3 some could not be used (every image is still "
        "written, those with their error); 1 the gateway refused or failed the call; 2 bad arguments",
    )
    predict.add_argument("paths", nargs="+", type=Path, help="image files or folders (searched recursively)")
    predict.add_argument("--model", default="", help="model name (default: the server's default model)")
    predict.add_argument("--version", default="", help="model version (default: the newest ready one)")
    predict.add_argument("--top-k", type=int, default=5)
    predict.add_argument("--out", type=Path, help="write here instead of standard output")
    predict.add_argument("--format", choices=["jsonl", "labelstudio"], default="jsonl",
                         help="jsonl: one JSON line per image; labelstudio: a JSON list of Label Studio tasks with "
                         "predictions, to import into a project")  # fmt: skip
    predict.add_argument("--ls-from-name", default="choice", help="labelstudio format: the <Choices> tag's name")
    predict.add_argument("--ls-to-name", default="image", help="labelstudio format: the <Image> tag's name")
    predict.add_argument("--ls-data-key", default="image", help="labelstudio format: the task field of the image")
    predict.add_argument("--ls-url-prefix", default="/data/local-files/?d=",
                         help="labelstudio format: put before each file's path to make the task's image URL "
                         "(default: Label Studio's local files storage)")  # fmt: skip
    predict.add_argument("--batch-size", type=int, default=32, help="images per request, at most")
    predict.add_argument(
        "--max-request-bytes",
        type=int,
        default=16 * 1024 * 1024,
        help="bytes per request, at most (a larger file goes alone)",
    )
    predict.add_argument("--embedding", action="store_true", help="include each image's embedding")
    predict.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    _client_flags(predict)

    train = commands.add_parser("train", help="fine-tune a model on an image folder and publish a new version")
    train.add_argument("folder", type=Path, help="one subfolder of images per class")
    train.add_argument("--base", required=True, help="model to start from (a model in the repository)")
    train.add_argument("--base-version", type=int, default=None, help="its version (default: the newest)")
    train.add_argument("--name", required=True, help="model to publish the result as (a new version of it)")
    _training_flags(train)
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--scratch-trial", choices=SCRATCH_TRIAL,
                       help="whether AUTO's trial also tries from scratch (default: "
                            "PRELABEL_TRAINER_SCRATCH_TRIAL, never)")  # fmt: skip
    train.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    train.add_argument("--data-dir", type=Path, help="where the model repository is (PRELABEL_DATA_DIR)")
    train.add_argument("--triton-url", help="Triton to load the new version into (default: the local prelabel serve)")

    finetune = commands.add_parser(
        "finetune", help="upload an image folder, fine-tune on it through the gateway, follow the job"
    )
    finetune.add_argument("folder", type=Path, help="one subfolder of images per class")
    finetune.add_argument("--base", default="", help="model to start from (default: the server's default model)")
    finetune.add_argument("--name", required=True, help="model to publish the result as (a new version of it)")
    finetune.add_argument("--dataset", default="", help="dataset to upload to (default: --name); uploads append")
    _training_flags(finetune)
    finetune.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    _client_flags(finetune)

    jobs = commands.add_parser("jobs", help="list fine-tune jobs, newest first, or cancel one")
    jobs.add_argument("--state", choices=["queued", "running", "succeeded", "failed", "cancelled"])
    jobs.add_argument("--limit", type=int, default=20)
    jobs.add_argument("--cancel", metavar="JOB_ID", help="cancel this job instead")
    _client_flags(jobs)

    health = commands.add_parser("health", help="exit 0 if the local gateway is SERVING (container health checks)")
    health.add_argument("--metrics", action="store_true", help="check that the metrics port answers instead (trainers)")
    _client_flags(health)
    health.set_defaults(timeout=5.0)

    init = commands.add_parser("init", help="put the default model into the model repository (what serve does first)")
    _service_flags(init)

    studio = commands.add_parser(
        "labelstudio", help="run a Label Studio ML backend: pre-label its tasks, fine-tune on its annotations",
        description=LABEL_STUDIO_HELP, formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    studio.add_argument("--host", dest="labelstudio_host", help="address to listen on (PRELABEL_LABELSTUDIO_HOST, "
                        "127.0.0.1; 0.0.0.0 when Label Studio runs elsewhere)")  # fmt: skip
    studio.add_argument("--port", dest="labelstudio_port", type=int, help="HTTP port (PRELABEL_LABELSTUDIO_PORT, 9090)")
    studio.add_argument(
        "--model",
        dest="labelstudio_model",
        help="model that pre-labels and is fine-tuned (default: the gateway's default model)",
    )
    studio.add_argument(
        "--project-model",
        dest="labelstudio_project_models",
        metavar="ID=MODEL[,ID=MODEL]",
        help="a different model for some projects (PRELABEL_LABELSTUDIO_PROJECT_MODELS)",
    )
    studio.add_argument("--train-every", dest="labelstudio_train_every", type=int,
                        help="annotation changes that start a fine-tune, 0: only Label Studio's Start Training "
                        "(PRELABEL_LABELSTUDIO_TRAIN_EVERY, 20)")  # fmt: skip
    studio.add_argument(
        "--strategy",
        dest="labelstudio_strategy",
        choices=[short_name(s) for s in STRATEGIES],
        help="fine-tuning strategy (default auto)",
    )
    studio.add_argument(
        "--basic-auth",
        dest="labelstudio_basic_auth",
        metavar="USER:PASSWORD",
        help="require HTTP basic auth from Label Studio (PRELABEL_LABELSTUDIO_BASIC_AUTH)",
    )
    studio.add_argument(
        "--label-studio-url",
        dest="labelstudio_url",
        help="Label Studio's address, for training before /setup told it (PRELABEL_LABELSTUDIO_URL)",
    )
    studio.add_argument(
        "--label-studio-token",
        dest="labelstudio_api_token",
        help="Label Studio API token, likewise (PRELABEL_LABELSTUDIO_API_TOKEN)",
    )
    studio.add_argument("--batch-size", dest="labelstudio_batch_size", type=int, help="images per Predict call (32)")
    _client_flags(studio)

    models = commands.add_parser("models", help="list models and their versions")
    _client_flags(models)
    return root


# What a command whose output stopped being read returns: a reader such as `head` closed the pipe, and
# tools killed by SIGPIPE exit 128 + 13 in the shell.
STOPPED_READING = 141
WRITE_DATA_DIR = ("serve", "gateway", "triton", "trainer", "init", "train")  # the commands that write there


def main(argv: list[str] | None = None) -> int:
    try:
        code = _main(argv)
        sys.stdout.flush()  # here, where a closed pipe is caught, rather than at exit
        return code
    except BrokenPipeError:  # `prelabel predict DIR | head`: stop quietly, as coreutils do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so the exit's flush cannot fail again
        return STOPPED_READING


def _main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    options = {k: v for k, v in vars(args).items() if k != "command"}
    try:
        if args.command in ("serve", "gateway", "triton"):
            from prelabel import launcher

            settings = Settings.from_env(**options)
            return launcher.run(settings, {"serve": "all"}.get(args.command, args.command))
        if args.command == "trainer":
            from prelabel.training import worker

            return worker.main(Settings.from_env(**options))
        if args.command == "init":
            from prelabel.triton.defaults import ensure_default_model
            from prelabel.triton.repository import repository_for

            settings = Settings.from_env(data_dir=args.data_dir, model_repository=args.model_repository)
            repository = repository_for(settings)
            ensure_default_model(repository, settings.default_model, settings.base_weights)
            repository.write_configs()  # this release's outputs, in a repository an older one wrote
            print(f"{settings.default_model} is in {settings.repository}")
            return 0
        if args.command == "train":
            from prelabel.cli import train

            settings = Settings.from_env(data_dir=args.data_dir, triton_url=args.triton_url,
                                         trainer_scratch_trial=args.scratch_trial)  # fmt: skip
            return train.train(settings, args)
        if args.command == "labelstudio":
            from prelabel.cli.client import Credentials
            from prelabel.labelstudio import server as studio

            client_options = {k: options.pop(k) for k in ("server", "timeout")}
            settings = Settings.from_env(**options)
            return studio.run(settings, client_options["server"] or f"127.0.0.1:{settings.grpc_port}",
                              Credentials.from_settings(settings), client_options["timeout"])  # fmt: skip
        from prelabel.cli import client

        settings = Settings.from_env(token=args.token, ca_cert=args.ca_cert, client_cert=args.client_cert,
                                     client_key=args.client_key)  # fmt: skip
        server = args.server or f"127.0.0.1:{settings.grpc_port}"
        creds = client.Credentials.from_settings(settings)
        try:
            if args.command == "predict":
                return client.predict(server, creds, args)
            if args.command == "health":
                return client.health(server, creds, settings, args)
            if args.command in ("finetune", "jobs"):
                from prelabel.cli import jobs

                return (jobs.finetune if args.command == "finetune" else jobs.jobs)(server, creds, args)
            return client.models(server, creds, args)
        except grpc.RpcError as exc:  # every client command: the status, and what the gateway said
            print(f"prelabel: {exc.code().name}: {exc.details()}", file=sys.stderr)
            return 1
    except PrelabelError as exc:
        print(f"prelabel: {exc.message}", file=sys.stderr)
        return 2
    except (OSError, sqlite3.Error) as exc:
        if args.command not in WRITE_DATA_DIR:  # where the data directory is written: a full or closed volume
            raise
        if full := volume_full(exc):
            print(f"prelabel: {full.message} [{exc}]", file=sys.stderr)
            return 1
        if isinstance(exc, OSError) and (isinstance(exc, PermissionError) or exc.errno == errno.EROFS):
            print(f"prelabel: cannot write {exc.filename} ({exc.strerror}) as uid {os.getuid()}: give this user write "
                  "access to the data directory (Kubernetes: the pod's runAsUser and fsGroup), or run as its owner",
                  file=sys.stderr)  # fmt: skip
            return 1
        raise


if __name__ == "__main__":
    sys.exit(main())
