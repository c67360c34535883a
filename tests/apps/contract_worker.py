"""The contract app as its worker runs it (`celery -A tests.apps.contract_worker`)."""

import os

from tests.apps.contract import make_app

app = make_app(os.environ.get("CONTRACT_SERIALIZER", "json"), os.environ["JOBWIRE_REDIS_URL"])
