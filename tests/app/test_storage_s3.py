"""app/storage_s3.py against a real S3-compatible server (moto_server on loopback, tests/conftest.py):
the URL setting, objects under the prefix, presigned URLs, deletes, and the start check's messages."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
from pydantic import ValidationError

from app.settings import ApiSettings, CommonSettings
from app.storage import LocalStorage, new_image_id
from app.storage_s3 import S3Location, S3Storage, StorageUnavailable
from app.stores import open_storage

ROOT = Path(__file__).resolve().parents[2]
PNG = b"\x89PNG\r\n\x1a\n-not-really-but-bytes"


@pytest.mark.parametrize("url, bucket, prefix", [
    ("s3://star-images", "star-images", ""),
    ("s3://star-images/", "star-images", ""),
    ("s3://star-images/prod/images", "star-images", "prod/images/"),
    ("s3://my.bucket-1/a/", "my.bucket-1", "a/"),
])
def test_storage_url_gives_bucket_and_prefix(url, bucket, prefix):
    assert S3Location.parse(url) == S3Location(bucket, prefix)
    assert S3Location.parse(url).key("abc") == f"{prefix}abc.png"


@pytest.mark.parametrize("url, message", [
    ("/data/images", "not an S3 URL"),
    ("gs://bucket/x", "not an S3 URL"),
    ("s3://Bucket_With_Caps", "not a valid bucket name"),
    ("s3://ab", "not a valid bucket name"),
    ("s3://bucket//double", "empty path segment"),
])
def test_a_bad_storage_url_is_refused_at_start_with_the_fix(url, message):
    with pytest.raises(ValidationError, match=message):
        CommonSettings(storage_url=url)


def test_an_empty_storage_url_means_local_storage(tmp_path):
    settings = CommonSettings(storage_url="", storage_dir=tmp_path)
    assert settings.storage_url is None
    assert isinstance(open_storage(settings), LocalStorage)


def test_url_modes_follow_the_signing_key():
    s3 = {"storage_url": "s3://star-images"}
    assert ApiSettings().image_urls == "local"
    assert ApiSettings(**s3).image_urls == "presigned"
    assert ApiSettings(**s3, url_signing_key="k" * 32).image_urls == "redirect"
    assert ApiSettings(**s3, s3_urls="redirect").image_urls == "redirect"
    with pytest.raises(ValidationError, match="STAR_URL_SIGNING_KEY would sign nothing"):
        ApiSettings(**s3, s3_urls="presigned", url_signing_key="k" * 32)
    with pytest.raises(ValidationError, match="at most 7 days"):
        ApiSettings(**s3, url_ttl_s=8 * 86400)


def test_put_get_delete_under_the_prefix(s3_server, s3_bucket):
    storage = open_storage(CommonSettings(storage_url=f"s3://{s3_bucket}/star/images"))
    assert isinstance(storage, S3Storage)
    image_id = new_image_id()
    storage.put(image_id, PNG)
    assert s3_server.keys(s3_bucket) == [f"star/images/{image_id}.png"]
    head = s3_server.client().head_object(Bucket=s3_bucket, Key=f"star/images/{image_id}.png")
    assert head["ContentType"] == "image/png" and "immutable" in head["CacheControl"]
    assert storage.get(image_id) == PNG
    assert storage.get(new_image_id()) is None and storage.get("../etc/passwd") is None
    storage.delete(image_id)
    storage.delete(image_id)   # absent: no error
    assert s3_server.keys(s3_bucket) == [] and storage.get(image_id) is None


def test_presigned_url_fetches_the_png_and_expires_as_configured(s3_server, s3_bucket):
    storage = open_storage(CommonSettings(storage_url=f"s3://{s3_bucket}/p"), urls="presigned", url_ttl_s=900)
    image_id = new_image_id()
    url = storage.put(image_id, PNG)
    parts = urlsplit(url)
    assert f"{parts.scheme}://{parts.netloc}" == s3_server.url and parts.path == f"/{s3_bucket}/p/{image_id}.png"
    query = parse_qs(parts.query)
    assert query["X-Amz-Algorithm"] == ["AWS4-HMAC-SHA256"] and query["X-Amz-Expires"] == ["900"]
    reply = httpx.get(url)
    assert reply.status_code == 200 and reply.content == PNG
    assert reply.headers["content-type"] == "image/png"


def test_presigned_urls_name_the_public_endpoint_when_one_is_set(s3_bucket):
    storage = open_storage(CommonSettings(storage_url=f"s3://{s3_bucket}"), urls="presigned",
                           public_endpoint_url="https://images.example.com")
    url = storage.url(new_image_id())
    assert url.startswith(f"https://images.example.com/{s3_bucket}/") and "X-Amz-Signature=" in url


def test_redirect_mode_urls_are_the_apis_and_redirect_only_to_stored_images(s3_bucket):
    settings = CommonSettings(storage_url=f"s3://{s3_bucket}", public_base_url="https://star.example.com/")
    storage = open_storage(settings, urls="redirect", redirect_ttl_s=60)
    image_id = new_image_id()
    assert storage.put(image_id, PNG) == f"https://star.example.com/images/{image_id}.png"
    target = storage.redirect_url(image_id)
    assert parse_qs(urlsplit(target).query)["X-Amz-Expires"] == ["60"]
    assert httpx.get(target).content == PNG
    assert storage.redirect_url(new_image_id()) is None and storage.redirect_url("not/an-id") is None


def test_the_check_passes_and_leaves_nothing_behind(s3_server, s3_bucket):
    open_storage(CommonSettings(storage_url=f"s3://{s3_bucket}/x"), check=True)
    assert s3_server.keys(s3_bucket) == []


def test_the_check_names_a_missing_bucket(s3_bucket):
    with pytest.raises(StorageUnavailable, match="s3://no-such-bucket/ at http://127.0.0.1:.*the bucket does not "
                       "exist: create it, or fix the bucket in STAR_STORAGE_URL"):
        open_storage(CommonSettings(storage_url="s3://no-such-bucket"), check=True)


def test_the_check_names_an_unreachable_endpoint(s3_bucket, aws_env):
    from app.redis_server import free_port

    aws_env.setenv("STAR_S3_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")
    with pytest.raises(StorageUnavailable, match="cannot reach the endpoint .* check STAR_S3_ENDPOINT_URL"):
        open_storage(CommonSettings(storage_url=f"s3://{s3_bucket}"), check=True)


def test_the_check_asks_for_credentials_when_there_are_none(s3_bucket, aws_env):
    aws_env.delenv("AWS_ACCESS_KEY_ID")
    aws_env.delenv("AWS_SECRET_ACCESS_KEY")
    with pytest.raises(StorageUnavailable, match="no credentials found: set AWS_ACCESS_KEY_ID"):
        open_storage(CommonSettings(storage_url=f"s3://{s3_bucket}"), check=True)


def test_signed_requests_pass_a_store_that_checks_signatures(s3_auth_server, aws_env):
    for key, value in s3_auth_server.env().items():
        aws_env.setenv(key, value)
    storage = open_storage(CommonSettings(storage_url="s3://star-auth/ok"), check=True)
    image_id = new_image_id()
    storage.put(image_id, PNG)
    assert storage.get(image_id) == PNG
    storage.delete(image_id)


@pytest.mark.parametrize("change, message", [
    ({"AWS_SECRET_ACCESS_KEY": "not-the-secret"}, "the secret key does not match the access key: check "
                                                  "AWS_SECRET_ACCESS_KEY"),
    ({"AWS_ACCESS_KEY_ID": "AKIAUNKNOWNKEY000000"}, "the store does not know this access key: check AWS_ACCESS_KEY_ID"),
])
def test_the_check_names_rejected_credentials(s3_auth_server, aws_env, change, message):
    for key, value in {**s3_auth_server.env(), **change}.items():
        aws_env.setenv(key, value)
    with pytest.raises(StorageUnavailable, match=message):
        open_storage(CommonSettings(storage_url="s3://star-auth"), check=True)


def test_lifecycle_rule_of_the_docs_is_accepted_by_the_store(s3_server, s3_bucket):
    """deploy/s3-lifecycle.json (docs/deploy.md) is a valid lifecycle configuration for the prefix."""
    rules = json.loads((ROOT / "deploy/s3-lifecycle.json").read_text())
    s3_server.client().put_bucket_lifecycle_configuration(Bucket=s3_bucket, LifecycleConfiguration=rules)
    (rule,) = s3_server.client().get_bucket_lifecycle_configuration(Bucket=s3_bucket)["Rules"]
    assert rule["Status"] == "Enabled" and rule["Expiration"]["Days"] >= 1
    assert rule["Filter"]["Prefix"] == "images/"


def test_the_api_imports_no_boto3_until_s3_storage_is_configured():
    code = "import sys, app.main, app.settings, app.storage_s3; assert 'boto3' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
