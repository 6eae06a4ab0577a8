"""The local stack: the embedded default that runs the whole product on 127.0.0.1 with no AWS account and
no OpenAI key (DynamoDB Local, moto server executing the deployed ASL, an API Gateway stand-in and
emulators of Ango Hub and of the OpenAI images API)."""
