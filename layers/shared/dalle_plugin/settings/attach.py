"""Attach Image's settings: the shared ones."""

from dalle_plugin.settings import CommonSettings


class AttachSettings(CommonSettings):
    pass
