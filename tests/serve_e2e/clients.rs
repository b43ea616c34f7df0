//! The clients the serve test talks through: plain HTTP/1.1 on a socket (so the test sees
//! exactly what a curl user sees), and a raw gRPC codec for malformed protobuf.

use serde_json::Value;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

/// One HTTP/1.1 request on a fresh connection: (status, body).
pub fn http(addr: &str, method: &str, path: &str, body: &[u8]) -> (u16, String) {
    request(addr, method, path, body, None).unwrap()
}

/// One HTTP/1.1 request with an optional `Authorization` value: (status, body), or why no
/// HTTP response came (a TLS port answering plain text, a closed connection).
pub fn request(
    addr: &str,
    method: &str,
    path: &str,
    body: &[u8],
    authorization: Option<&str>,
) -> Result<(u16, String), String> {
    let mut c = TcpStream::connect(addr).map_err(|e| e.to_string())?;
    c.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let auth = authorization.map_or(String::new(), |a| format!("Authorization: {a}\r\n"));
    write!(
        c,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\n{auth}Content-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .map_err(|e| e.to_string())?;
    c.write_all(body).map_err(|e| e.to_string())?;
    let mut out = Vec::new();
    let _ = c.read_to_end(&mut out);
    let text = String::from_utf8_lossy(&out).into_owned();
    if !text.starts_with("HTTP/1.1 ") || text.len() < 12 {
        return Err(format!("no HTTP response: {text:?}"));
    }
    let status = text[9..12].parse().map_err(|_| text.clone())?;
    let body = text.split_once("\r\n\r\n").map(|x| x.1).unwrap_or("");
    Ok((status, body.to_string()))
}

pub fn post(addr: &str, path: &str, v: &Value) -> (u16, Value) {
    let (st, b) = http(addr, "POST", path, v.to_string().as_bytes());
    (st, serde_json::from_str(&b).unwrap_or(Value::Null))
}

/// Sends raw bytes as a gRPC message, for malformed protobuf.
pub mod raw {
    use prost::bytes::{Buf, BufMut};
    use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
    use tonic::Status;

    #[derive(Default, Clone)]
    pub struct Raw;
    impl Codec for Raw {
        type Encode = Vec<u8>;
        type Decode = Vec<u8>;
        type Encoder = Raw;
        type Decoder = Raw;
        fn encoder(&mut self) -> Raw {
            Raw
        }
        fn decoder(&mut self) -> Raw {
            Raw
        }
    }
    impl Encoder for Raw {
        type Item = Vec<u8>;
        type Error = Status;
        fn encode(&mut self, item: Vec<u8>, buf: &mut EncodeBuf<'_>) -> Result<(), Status> {
            buf.put_slice(&item);
            Ok(())
        }
    }
    impl Decoder for Raw {
        type Item = Vec<u8>;
        type Error = Status;
        fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<Vec<u8>>, Status> {
            let n = buf.remaining();
            Ok(Some(buf.copy_to_bytes(n).to_vec()))
        }
    }
}

pub fn field_of(s: &tonic::Status) -> String {
    s.metadata()
        .get("gpo-field")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string()
}
