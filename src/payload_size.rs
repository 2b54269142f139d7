//! The size of an event's payload without reading it, for the claim's
//! byte budget and pipeline.max_event_size (sql/013_delivery.sql).
//!
//! A large payload is stored compressed, out of line: its stored size can
//! be a small fraction of what the worker would hold once it is expanded
//! into a request body. The uncompressed size is written in the value's
//! header, and toast_raw_datum_size reads it there, without fetching or
//! decompressing anything. This replaces the SQL stand-in of the same name
//! (the stored size), which trigger-only installs keep.

use pgrx::prelude::*;
use pgrx::AnyElement;

#[pg_extern(
    sql = "
    CREATE OR REPLACE FUNCTION pipeline._payload_bytes(payload jsonb) RETURNS bigint
    LANGUAGE c IMMUTABLE STRICT AS 'MODULE_PATHNAME', 'payload_bytes_wrapper';
",
    requires = ["delivery"]
)]
fn payload_bytes(payload: AnyElement) -> i64 {
    // SAFETY: the function is declared for jsonb, a varlena type, and is
    // STRICT: the datum is a valid, possibly toasted, varlena pointer, whose
    // header alone is read.
    let bytes = unsafe { pg_sys::toast_raw_datum_size(payload.datum()) };
    bytes as i64
}
