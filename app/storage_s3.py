"""Images in an S3-compatible bucket (AWS S3, MinIO, Cloudflare R2, ...): `STAR_STORAGE_URL=s3://BUCKET/PREFIX`.

Workers `put` each PNG as the object `PREFIX/<image id>.png` and `delete` the ones never published;
`check()`, run when a worker starts, writes and deletes a probe object, so a wrong bucket, endpoint
or credentials stop the worker with a message instead of failing every job. The API hands clients
either presigned GET URLs of the store (`presigned`: the store serves the bytes) or its own
`/images/<id>.png` URLs, which answer 307 to a short-lived presigned URL (`redirect`; app.main).
Nothing expires here: retention is the bucket's lifecycle rule (docs/deploy.md).

Credentials and region come from boto3's standard chain (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY,
AWS_PROFILE and ~/.aws, web identity / IRSA, instance roles), the endpoint from STAR_S3_ENDPOINT_URL
or AWS_ENDPOINT_URL_S3. boto3 (the `s3` extra) is imported only when S3 storage is configured.
"""
from __future__ import annotations

import os
import re
import secrets
from dataclasses import dataclass
from typing import Any

from app.storage import is_image_id

BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
MAX_PRESIGN_S = 7 * 24 * 3600     # SigV4 presigned URLs live at most 7 days
IMAGE_CACHE_CONTROL = "public, max-age=31536000, immutable"   # an image id never changes content


class StorageUnavailable(RuntimeError):
    """The store cannot be used as configured; the message says what to fix."""


@dataclass(frozen=True)
class S3Location:
    bucket: str
    prefix: str   # "" or ending with "/"

    @classmethod
    def parse(cls, url: str) -> "S3Location":
        """`s3://BUCKET[/PREFIX]`; ValueError saying what is wrong otherwise."""
        match = re.fullmatch(r"s3://([^/]*)(?:/(.*))?", url.strip())
        if match is None:
            raise ValueError(f"{url!r} is not an S3 URL: use s3://BUCKET or s3://BUCKET/PREFIX "
                             "(a local directory is STAR_STORAGE_DIR)")
        bucket, raw = match.group(1), match.group(2) or ""
        prefix = raw.strip("/")
        if not BUCKET_RE.match(bucket) or ".." in bucket:
            raise ValueError(f"{bucket!r} is not a valid bucket name: 3 to 63 lowercase letters, digits, "
                             "dots and hyphens, starting and ending with a letter or digit")
        if raw.startswith("/") or "//" in raw:
            raise ValueError(f"prefix {raw!r} has an empty path segment")
        return cls(bucket, prefix + "/" if prefix else "")

    def key(self, image_id: str) -> str:
        return f"{self.prefix}{image_id}.png"

    def __str__(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}"


def _boto3():
    try:
        import boto3
    except ImportError:
        raise StorageUnavailable("STAR_STORAGE_URL=s3://... needs boto3: pip install 'star-service[s3]' "
                                 "(the container images have it)") from None
    return boto3


def make_client(endpoint_url: str | None, region: str | None, addressing_style: str) -> Any:
    """A thread-safe boto3 S3 client. Checksums only where S3 requires them, so older MinIO and
    other S3-compatible stores accept the uploads; SigV4 (R2 and recent MinIO accept nothing else)."""
    from botocore.config import Config

    config = Config(signature_version="s3v4", s3={"addressing_style": addressing_style},
                    retries={"max_attempts": 3, "mode": "standard"}, connect_timeout=5, read_timeout=30,
                    request_checksum_calculation="when_required", response_checksum_validation="when_required")
    region = region or os.environ.get("AWS_REGION") or None   # boto3 itself reads AWS_DEFAULT_REGION
    return _boto3().session.Session().client("s3", endpoint_url=endpoint_url or None, region_name=region,
                                             config=config)


class S3Storage:
    """The Storage of app.storage over one bucket and prefix."""

    def __init__(self, location: S3Location, *, endpoint_url: str | None = None, region: str | None = None,
                 addressing_style: str = "auto", public_base_url: str = "", urls: str = "presigned",
                 url_ttl_s: int = 3600, redirect_ttl_s: int = 300, public_endpoint_url: str | None = None):
        if urls not in ("presigned", "redirect"):
            raise ValueError(f"urls must be 'presigned' or 'redirect', not {urls!r}")
        self.location = location
        self.client = make_client(endpoint_url, region, addressing_style)
        # Presigning is local (no request): a second client signs for the address clients reach.
        self.presigner = (make_client(public_endpoint_url, region, addressing_style)
                          if public_endpoint_url else self.client)
        self.public_base_url = public_base_url.rstrip("/")
        self.urls, self.url_ttl_s, self.redirect_ttl_s = urls, url_ttl_s, redirect_ttl_s

    @classmethod
    def from_settings(cls, settings, **urls) -> "S3Storage":
        """From CommonSettings; `urls`: urls, url_ttl_s, redirect_ttl_s, public_endpoint_url (the API's)."""
        return cls(S3Location.parse(settings.storage_url), endpoint_url=settings.s3_endpoint_url,
                   region=settings.s3_region, addressing_style=settings.s3_addressing_style,
                   public_base_url=settings.public_base_url, **urls)

    def _key(self, image_id: str) -> str:
        if not is_image_id(image_id):
            raise ValueError(f"not an image id: {image_id!r}")
        return self.location.key(image_id)

    def describe(self) -> str:
        return f"{self.location} at {self.client.meta.endpoint_url}"

    def put(self, image_id: str, data: bytes) -> str:
        self.client.put_object(Bucket=self.location.bucket, Key=self._key(image_id), Body=data,
                               ContentType="image/png", CacheControl=IMAGE_CACHE_CONTROL)
        return self.url(image_id)

    def get(self, image_id: str) -> bytes | None:
        if not is_image_id(image_id):
            return None
        try:
            reply = self.client.get_object(Bucket=self.location.bucket, Key=self._key(image_id))
        except self.client.exceptions.NoSuchKey:
            return None
        return reply["Body"].read()

    def exists(self, image_id: str) -> bool:
        from botocore.exceptions import ClientError

        try:
            self.client.head_object(Bucket=self.location.bucket, Key=self._key(image_id))
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return False
            raise
        return True

    def delete(self, image_id: str) -> None:
        """No error when absent (S3 deletes are idempotent) or not an image id (as LocalStorage)."""
        if is_image_id(image_id):
            self.client.delete_object(Bucket=self.location.bucket, Key=self._key(image_id))

    def presigned_url(self, image_id: str, ttl_s: int) -> str:
        return self.presigner.generate_presigned_url(
            "get_object", Params={"Bucket": self.location.bucket, "Key": self._key(image_id)},
            ExpiresIn=ttl_s)

    def url(self, image_id: str) -> str:
        """What clients are given: a presigned URL of the store, or the API's /images URL."""
        if self.urls == "presigned":
            return self.presigned_url(image_id, self.url_ttl_s)
        return f"{self.public_base_url}/images/{image_id}.png"

    def redirect_url(self, image_id: str) -> str | None:
        """Where GET /images/<id>.png redirects (a presigned URL valid redirect_ttl_s), or None
        when the image is not in the store."""
        if not is_image_id(image_id) or not self.exists(image_id):
            return None
        return self.presigned_url(image_id, self.redirect_ttl_s)

    def check(self) -> None:
        """Write and delete a probe object (what a worker does with every image);
        StorageUnavailable saying what to fix when that fails."""
        key = f"{self.location.prefix}.star-check-{secrets.token_hex(8)}"
        try:
            self.client.put_object(Bucket=self.location.bucket, Key=key, Body=b"")
            self.client.delete_object(Bucket=self.location.bucket, Key=key)
        except Exception as exc:
            raise StorageUnavailable(explain(exc, self.describe())) from exc


ADVICE = {
    "NoSuchBucket": "the bucket does not exist: create it, or fix the bucket in STAR_STORAGE_URL",
    "InvalidAccessKeyId": "the store does not know this access key: check AWS_ACCESS_KEY_ID (and that "
                          "the endpoint is the store the key belongs to)",
    "SignatureDoesNotMatch": "the secret key does not match the access key: check AWS_SECRET_ACCESS_KEY",
    "AccessDenied": "the credentials may not write and delete objects under this prefix: grant "
                    "s3:PutObject, s3:GetObject and s3:DeleteObject on it",
    "AllAccessDisabled": "access to this bucket is disabled",
    "InvalidBucketName": "the bucket name is not valid for this store",
    "PermanentRedirect": "the bucket is in another region: set STAR_S3_REGION (or AWS_REGION) to its region",
    "AuthorizationHeaderMalformed": "the region is wrong for this bucket: set STAR_S3_REGION (or AWS_REGION)",
    "ExpiredToken": "the session token has expired: refresh the credentials",
    "InvalidToken": "the session token is not valid: check AWS_SESSION_TOKEN",
}


def explain(exc: BaseException, where: str) -> str:
    """One line for an operator: what failed against which store, and what to change."""
    from botocore.exceptions import ClientError, EndpointConnectionError, NoCredentialsError

    if isinstance(exc, NoCredentialsError):
        advice = ("no credentials found: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, AWS_PROFILE, "
                  "or give the pod or instance a role")
    elif isinstance(exc, EndpointConnectionError):
        advice = f"cannot reach the endpoint ({exc}): check STAR_S3_ENDPOINT_URL (or AWS_ENDPOINT_URL_S3)"
    elif isinstance(exc, ClientError):
        error = exc.response.get("Error", {})
        code = str(error.get("Code", ""))
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        default = f"the store refused: {code or status} {error.get('Message', '')}".strip()
        advice = ADVICE.get(code, ADVICE["AccessDenied"] if status == 403 else default)
    else:
        advice = f"{type(exc).__name__}: {exc}"
    return f"image storage {where} is not usable: {advice}"
