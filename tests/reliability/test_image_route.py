"""GET /images/{id}.png against hostile input, without any API key: signed URLs accept only the
canonical form they were issued in (anything else is 403, never a 500), and the storage directory
never serves a file outside itself (symbolic links inside it are 404, whatever they point at)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from app.storage import LocalStorage

IMAGE = "AAAAAAAAAAAAAAAAAAAAAA"


@pytest.fixture
def make_client(make_api_settings):
    clients = []

    def make(**overrides) -> TestClient:
        from app.main import create_app

        client = TestClient(create_app(make_api_settings(**overrides)), raise_server_exceptions=False)
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.close()


# ------------------------------------------------------------------------------------ signed URLs

def signed(client: TestClient) -> tuple[str, str]:
    """(expires, sig) of a fresh URL of IMAGE."""
    query = dict(part.split("=") for part in client.app.state.ctx.storage.url(IMAGE).split("?")[1].split("&"))
    return query["expires"], query["sig"]


def test_a_signed_url_is_accepted_only_in_the_form_it_was_issued(make_client, tmp_path):
    client = make_client(url_signing_key="s3cret")
    LocalStorage(tmp_path / "images", "http://testserver").put(IMAGE, b"\x89PNG fake")
    expires, sig = signed(client)
    assert client.get(f"/images/{IMAGE}.png?expires={expires}&sig={sig}").status_code == 200   # control
    arabic = "".join(chr(0x0660 + int(d)) for d in expires)    # the same number in Arabic-Indic digits
    for bad_expires, bad_sig in (
        ("0" + expires, sig),            # a leading zero: same number, not the signed string
        ("00" + expires, sig),
        (arabic, sig),
        (f"+{expires}", sig), (f"{expires}%0A", sig), (f"%20{expires}", sig),
        ("%C2%B2", sig),                 # a superscript two: Python calls it a digit
        (expires, "%C3%A9"),             # a non-ASCII signature
        (expires, sig + "%C3%A9"), (expires, "%00"), ("9" * 40, sig), ("", sig), (expires, ""),
    ):
        response = client.get(f"/images/{IMAGE}.png?expires={bad_expires}&sig={bad_sig}")
        assert response.status_code == 403, (bad_expires, bad_sig, response.status_code, response.text)
        assert response.json()["error"]["code"] == "forbidden"


# ------------------------------------------------------------------------------------ storage

def outside_file(tmp_path: Path) -> Path:
    secret = tmp_path / "outside" / "secret.png"
    secret.parent.mkdir(exist_ok=True)
    secret.write_bytes(b"not yours")
    return secret


def test_links_inside_the_storage_directory_are_never_followed(make_client, make_api_settings, tmp_path):
    client = make_client()
    root = Path(make_api_settings().storage_dir)
    storage = LocalStorage(root, "http://testserver")
    storage.put(IMAGE, b"\x89PNG mine")
    secret = outside_file(tmp_path)
    file_link = "BB" + IMAGE[2:]                                  # a PNG name that is a link
    (root / "BB").mkdir()
    (root / "BB" / f"{file_link}.png").symlink_to(secret)
    dir_link = "CC" + IMAGE[2:]                                   # a fan-out directory that is a link
    (root / "CC").symlink_to(secret.parent, target_is_directory=True)
    os.link(secret, secret.parent / f"{dir_link}.png")
    relative = "DD" + IMAGE[2:]                                   # a relative link climbing out
    (root / "DD").mkdir()
    (root / "DD" / f"{relative}.png").symlink_to(Path("..", "..", "outside", "secret.png"))
    assert client.get(f"/images/{IMAGE}.png").content == b"\x89PNG mine"   # control
    for image_id in (file_link, dir_link, relative):
        response = client.get(f"/images/{image_id}.png")
        assert response.status_code == 404 and b"not yours" not in response.content, image_id
        assert storage.get(image_id) is None
    with pytest.raises(OSError):                                  # nor written through
        storage.put("CC" + "B" * 20, b"\x89PNG new")
    assert sorted(p.name for p in secret.parent.iterdir()) == sorted(["secret.png", f"{dir_link}.png"])


def test_a_storage_directory_that_is_itself_a_link_still_serves(make_api_settings, tmp_path):
    """The operator's own choice of directory (a mounted volume behind a link) is not refused."""
    from app.main import create_app

    real = tmp_path / "volume"
    real.mkdir()
    link = tmp_path / "linked-images"
    link.symlink_to(real, target_is_directory=True)
    LocalStorage(link, "http://testserver").put(IMAGE, b"\x89PNG via link")
    with TestClient(create_app(make_api_settings().model_copy(update={"storage_dir": link}))) as client:
        assert client.get(f"/images/{IMAGE}.png").content == b"\x89PNG via link"
    assert (real / IMAGE[:2] / f"{IMAGE}.png").exists()


def test_odd_image_paths_are_404_never_500(make_client):
    client = make_client()
    for path in ("/images/%ED%A0%80.png", "/images/..%2F..%2Fetc%2Fpasswd.png", "/images/%00.png",
                 f"/images/{IMAGE}%00.png", "/images/" + "A" * 5000 + ".png"):
        assert client.get(path).status_code == 404, path
    signed_client = make_client(url_signing_key="s3cret")
    for path in ("/images/%ED%A0%80.png?expires=1&sig=x", "/images/%C3%A9.png"):
        assert signed_client.get(path).status_code == 403, path
