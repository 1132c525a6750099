//! Client side: stable `Idempotency-Key`s on outgoing requests, across retries.
