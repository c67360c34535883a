"""The peers jobwire is measured against, written the way their users write them. They
run in their own virtualenv (`.venv-peers`, see `make bench`), with the versions pinned
there."""
