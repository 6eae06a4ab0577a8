"""Thin AWS adapters: images in S3, secrets sealed with KMS, the default key in Secrets Manager, and
executions in Step Functions. Clients are injected; endpoints come from boto3's own environment
variables (``AWS_ENDPOINT_URL_*``), so the local stack needs no code path of its own."""

from __future__ import annotations

import json
import time
from typing import Any

from botocore.exceptions import ClientError

from dalle_plugin.domain.errors import StorageUnavailable
from dalle_plugin.port_records import StoredObject


class _BucketObjects:
    """Objects in the plugin's bucket; ``what`` names them in the sentence a failed read ends with."""

    what = "object"

    def __init__(self, client: Any, bucket: str):
        self._client = client
        self._bucket = bucket

    def get(self, key: str) -> bytes | None:
        try:
            return self._client.get_object(Bucket=self._bucket, Key=key)["Body"].read()
        except ClientError as exc:
            if exc.response["Error"]["Code"] in ("NoSuchKey", "404"):
                return None
            raise StorageUnavailable(
                f"Could not read the {self.what}: {exc.response['Error']['Code']}"
            ) from None


class S3ImageStore(_BucketObjects):
    what = "image from S3"

    def put_image(self, key: str, body: bytes, content_type: str, metadata: dict[str, str]) -> StoredObject:
        try:
            self._client.put_object(
                Bucket=self._bucket, Key=key, Body=body, ContentType=content_type, Metadata=metadata
            )
        except ClientError as exc:
            raise StorageUnavailable(
                f"Could not store the image in S3: {exc.response['Error']['Code']}"
            ) from None
        return StoredObject(bucket=self._bucket, key=key)

    def presigned_url(self, key: str, expires_s: int = 3600) -> str:
        return self._client.generate_presigned_url(
            "get_object", Params={"Bucket": self._bucket, "Key": key}, ExpiresIn=expires_s
        )


class KmsSecretVault:
    """Envelope-free KMS encryption: the secrets are small (< 4 KB), so KMS encrypts them directly."""

    def __init__(self, client: Any, key_id: str):
        self._client = client
        self._key_id = key_id

    def seal(self, secrets: dict[str, str], context: dict[str, str]) -> bytes:
        plaintext = json.dumps(secrets, separators=(",", ":")).encode()
        return self._client.encrypt(KeyId=self._key_id, Plaintext=plaintext, EncryptionContext=context)[
            "CiphertextBlob"
        ]

    def open(self, sealed: bytes, context: dict[str, str]) -> dict[str, str]:
        plaintext = self._client.decrypt(
            CiphertextBlob=sealed, KeyId=self._key_id, EncryptionContext=context
        )["Plaintext"]
        return json.loads(plaintext)


#: how long a warm Lambda keeps a secret before reading it again: a rotated or revoked key or Secret is seen
#: within this time
SECRET_MAX_AGE_S = 120


class GetParameterError(Exception):
    """A secret could not be read. Named, with the reader's message, as Powertools Parameters named it when
    it read the secrets: the error a step fails with (and the Catch path describes) stays the same."""


class CachedSecrets:
    """Secrets from Secrets Manager, each kept ``max_age_s`` and then read again, so a rotation reaches warm
    Lambdas. The client is injected (its endpoint is botocore's own, as for every adapter); no value is ever
    logged. Not Powertools Parameters: its package imports boto3 (and s3transfer, multiprocessing) on the
    first request of every function that reads a secret, for one call and a cache."""

    def __init__(self, client: Any, max_age_s: int = SECRET_MAX_AGE_S):
        self._client = client
        self._max_age_s = max_age_s
        self._cache: dict[str, tuple[float, str]] = {}  # secret id -> (read again after, value)

    def read(self, secret_id: str) -> str:
        cached = self._cache.get(secret_id)
        if cached is not None and time.monotonic() < cached[0]:
            return cached[1]
        try:
            answer = self._client.get_secret_value(SecretId=secret_id)
        except Exception as exc:
            raise GetParameterError(str(exc)) from exc
        secret = answer["SecretString"] if "SecretString" in answer else answer["SecretBinary"]
        value = secret.decode() if isinstance(secret, bytes) else str(secret)
        self._cache[secret_id] = (time.monotonic() + self._max_age_s, value)
        return value


class StepFunctionsStarter:
    def __init__(self, client: Any, state_machine_arn: str):
        self._client = client
        self._arn = state_machine_arn

    def start(self, name: str, run_input: dict[str, Any]) -> str:
        try:
            return self._client.start_execution(
                stateMachineArn=self._arn, name=name, input=json.dumps(run_input)
            )["executionArn"]
        except ClientError as exc:
            if exc.response["Error"]["Code"] != "ExecutionAlreadyExists":
                raise
            # Same name: the same hub run was already started; its execution is the answer.
            return self.arn_of(name)

    def arn_of(self, name: str) -> str:
        return self._arn.replace(":stateMachine:", ":execution:") + ":" + name

    def running(self, name_prefix: str) -> int:
        # ListExecutions has no name filter: its pages of up to 1,000 running executions are read whole
        pages = self._client.get_paginator("list_executions").paginate(
            stateMachineArn=self._arn, statusFilter="RUNNING"
        )
        return sum(e["name"].startswith(name_prefix) for page in pages for e in page["executions"])

    def stop(self, execution_arn: str, cause: str) -> None:
        try:
            self._client.stop_execution(executionArn=execution_arn, error="RunCancelled", cause=cause)
        except ClientError as exc:
            if exc.response["Error"]["Code"] != "ExecutionDoesNotExist":
                raise


class S3BatchRequests(_BucketObjects):
    """Accepted batch requests as objects in the plugin's bucket (under ``batches/``, expired by its
    lifecycle rule)."""

    what = "batch request"

    def put(self, key: str, body: bytes) -> None:
        try:
            self._client.put_object(Bucket=self._bucket, Key=key, Body=body, ContentType="application/json")
        except ClientError as exc:
            raise StorageUnavailable(
                f"Could not store the batch request: {exc.response['Error']['Code']}"
            ) from None
