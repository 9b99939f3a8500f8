import os
import tempfile

# Every test run shares one tokenised-data cache (CI points it at its own folder).
os.environ.setdefault("STACKWISE_DS_CACHE", os.path.join(tempfile.gettempdir(), "stackwise_ds_test_cache"))
os.environ.setdefault("PYTHONUNBUFFERED", "1")
