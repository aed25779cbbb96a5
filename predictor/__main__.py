"""Entry point: ``python -m predictor --model_name sd [--model_id ...]``."""

from __future__ import annotations

import logging
import os
import sys

from predictor.config import parse_settings
from predictor.logs import install_log_filters


def main(argv: list[str] | None = None) -> int:
    args, settings = parse_settings(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    install_log_filters()
    logger = logging.getLogger("predictor")

    if settings.engine.compile:
        # Before torch is imported: inductor and triton read their cache locations from the environment.
        cache_dir = settings.server.compile_cache_dir
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache_dir
        os.environ["TRITON_CACHE_DIR"] = os.path.join(cache_dir, "triton")

    from predictor.model import DiffusionModel
    from predictor.server import PredictorServer

    model = DiffusionModel(settings)
    server = PredictorServer(
        settings,
        http_port=args.http_port,
        grpc_port=args.grpc_port,
        enable_grpc=args.enable_grpc,
        grpc_options=vars(args),
        enable_latency_logging=args.enable_latency_logging,
    )
    server.serve(model)  # loads the model in the background; the listener answers meanwhile
    code = 1 if server.load_error is not None else 0
    if code == 0:
        logger.info("server stopped")
    if model.loading:
        # Stopped while the loading thread is inside torch (reading weights, compiling): do not let the
        # interpreter tear down modules under it; leave now, with the logs flushed.
        logging.shutdown()
        os._exit(code)
    return code


if __name__ == "__main__":
    sys.exit(main())
