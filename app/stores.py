"""`open_storage`: the image store the settings name. The S3-compatible store of app.storage_s3 when
STAR_STORAGE_URL is set, else the local directory of app.storage (STAR_STORAGE_DIR)."""
from __future__ import annotations

from app.settings import CommonSettings
from app.storage import LocalStorage
from app.storage_s3 import S3Storage


def open_storage(settings: CommonSettings, check: bool = False, **s3_urls) -> LocalStorage | S3Storage:
    """`check` (a worker starting): write and delete a probe object in S3, raising
    app.storage_s3.StorageUnavailable with what to fix. `s3_urls`: S3Storage's URL options (the API's:
    urls, url_ttl_s, redirect_ttl_s, public_endpoint_url)."""
    if not settings.storage_url:
        return LocalStorage(settings.storage_dir, settings.public_base_url)
    storage = S3Storage.from_settings(settings, **s3_urls)
    if check:
        storage.check()
    return storage
