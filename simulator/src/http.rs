//! Minimal hand-written HTTP/1.1 server side: request parsing (httparse) and response heads.

use std::io;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const MAX_HEAD: usize = 64 * 1024;
const MAX_BODY: usize = 32 * 1024 * 1024;
const MAX_HEADERS: usize = 128;

#[derive(Debug)]
pub(crate) struct Request {
    pub method: String,
    /// Request target as sent (path plus optional query).
    pub target: String,
    /// Minor HTTP version (0 or 1).
    pub version: u8,
    /// Header names lower-cased, in order.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Request {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// Path without the query string.
    pub fn path(&self) -> &str {
        self.target.split(['?', '#']).next().unwrap_or("")
    }

    /// Whether the connection may be reused after this request.
    pub fn keep_alive(&self) -> bool {
        let conn = self
            .header("connection")
            .map(|v| v.to_ascii_lowercase())
            .unwrap_or_default();
        let tokens: Vec<&str> = conn.split(',').map(str::trim).collect();
        if tokens.contains(&"close") {
            return false;
        }
        self.version >= 1 || tokens.contains(&"keep-alive")
    }
}

#[derive(Debug)]
pub(crate) enum ReadError {
    /// Socket error; just drop the connection.
    Io,
    /// Malformed request; answer 400 and close.
    Bad(String),
    /// Head or body over the limits; answer 413/431 and close.
    TooLarge(u16),
}

impl From<io::Error> for ReadError {
    fn from(_: io::Error) -> Self {
        ReadError::Io
    }
}

async fn read_more(sock: &mut TcpStream, buf: &mut Vec<u8>) -> io::Result<usize> {
    buf.reserve(16 * 1024);
    sock.read_buf(buf).await
}

/// Read one request from `sock`. `buf` carries bytes already read past the previous request
/// (pipelining). `Ok(None)` means the client closed the connection cleanly between requests.
pub(crate) async fn read_request(
    sock: &mut TcpStream,
    buf: &mut Vec<u8>,
) -> Result<Option<Request>, ReadError> {
    let (method, target, version, headers) = loop {
        if !buf.is_empty() {
            let mut hdrs = [httparse::EMPTY_HEADER; MAX_HEADERS];
            let mut req = httparse::Request::new(&mut hdrs);
            match req.parse(buf) {
                Ok(httparse::Status::Complete(n)) => {
                    let method = req.method.unwrap_or("").to_string();
                    let target = req.path.unwrap_or("").to_string();
                    let version = req.version.unwrap_or(1);
                    let headers: Vec<(String, String)> = req
                        .headers
                        .iter()
                        .map(|h| {
                            (
                                h.name.to_ascii_lowercase(),
                                String::from_utf8_lossy(h.value).trim().to_string(),
                            )
                        })
                        .collect();
                    buf.drain(..n);
                    break (method, target, version, headers);
                }
                Ok(httparse::Status::Partial) => {
                    if buf.len() > MAX_HEAD {
                        return Err(ReadError::TooLarge(431));
                    }
                }
                Err(httparse::Error::TooManyHeaders) => return Err(ReadError::TooLarge(431)),
                Err(e) => return Err(ReadError::Bad(format!("malformed request head: {e}"))),
            }
        }
        if read_more(sock, buf).await? == 0 {
            if buf.is_empty() {
                return Ok(None);
            }
            return Err(ReadError::Bad("connection closed mid-request".into()));
        }
    };

    let mut req = Request {
        method,
        target,
        version,
        headers,
        body: Vec::new(),
    };

    let chunked = req
        .header("transfer-encoding")
        .map(|v| v.to_ascii_lowercase().contains("chunked"))
        .unwrap_or(false);
    let content_length = match req.header("content-length") {
        Some(v) if !chunked => Some(
            v.parse::<usize>()
                .map_err(|_| ReadError::Bad(format!("invalid content-length `{v}`")))?,
        ),
        _ => None,
    };
    let expects_continue = req
        .header("expect")
        .map(|v| v.eq_ignore_ascii_case("100-continue"))
        .unwrap_or(false);

    if chunked {
        let mut sent_continue = false;
        loop {
            if let Some((body, used)) = decode_chunked(buf)? {
                buf.drain(..used);
                req.body = body;
                break;
            }
            if buf.len() > MAX_BODY + MAX_HEAD {
                return Err(ReadError::TooLarge(413));
            }
            if expects_continue && !sent_continue {
                sock.write_all(b"HTTP/1.1 100 Continue\r\n\r\n").await?;
                sent_continue = true;
            }
            if read_more(sock, buf).await? == 0 {
                return Err(ReadError::Bad("connection closed mid-body".into()));
            }
        }
    } else if let Some(len) = content_length {
        if len > MAX_BODY {
            return Err(ReadError::TooLarge(413));
        }
        if expects_continue && buf.len() < len {
            sock.write_all(b"HTTP/1.1 100 Continue\r\n\r\n").await?;
        }
        while buf.len() < len {
            if read_more(sock, buf).await? == 0 {
                return Err(ReadError::Bad("connection closed mid-body".into()));
            }
        }
        req.body = buf.drain(..len).collect();
    }
    Ok(Some(req))
}

/// Decode a complete chunked body at the start of `buf`; `Ok(None)` if more bytes are needed.
/// Returns the body and the number of bytes consumed (including trailers).
fn decode_chunked(buf: &[u8]) -> Result<Option<(Vec<u8>, usize)>, ReadError> {
    let mut pos = 0usize;
    let mut body = Vec::new();
    loop {
        match httparse::parse_chunk_size(&buf[pos..]) {
            Ok(httparse::Status::Complete((n, size))) => {
                pos += n;
                if size == 0 {
                    // Trailer section: header lines until an empty line.
                    loop {
                        let Some(idx) = buf[pos..].windows(2).position(|w| w == b"\r\n") else {
                            return Ok(None);
                        };
                        let empty = idx == 0;
                        pos += idx + 2;
                        if empty {
                            return Ok(Some((body, pos)));
                        }
                    }
                }
                let size = usize::try_from(size)
                    .ok()
                    .filter(|s| body.len() + s <= MAX_BODY)
                    .ok_or(ReadError::TooLarge(413))?;
                if buf.len() < pos + size + 2 {
                    return Ok(None);
                }
                body.extend_from_slice(&buf[pos..pos + size]);
                pos += size;
                if &buf[pos..pos + 2] != b"\r\n" {
                    return Err(ReadError::Bad("malformed chunk".into()));
                }
                pos += 2;
            }
            Ok(httparse::Status::Partial) => return Ok(None),
            Err(_) => return Err(ReadError::Bad("malformed chunk size".into())),
        }
    }
}

pub(crate) fn reason(status: u16) -> &'static str {
    match status {
        100 => "Continue",
        200 => "OK",
        201 => "Created",
        204 => "No Content",
        400 => "Bad Request",
        401 => "Unauthorized",
        402 => "Payment Required",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        409 => "Conflict",
        410 => "Gone",
        413 => "Payload Too Large",
        415 => "Unsupported Media Type",
        422 => "Unprocessable Entity",
        429 => "Too Many Requests",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        520 => "Unknown Error",
        524 => "A Timeout Occurred",
        _ => "Unknown",
    }
}

/// Serialize a response head. `content-length` and `connection` are added here.
pub(crate) fn head(
    status: u16,
    headers: &[(String, String)],
    content_length: usize,
    close: bool,
) -> Vec<u8> {
    head_with(status, headers, Some(content_length), close)
}

/// One chunk of a `transfer-encoding: chunked` body (an empty `data` is the last chunk).
pub(crate) fn chunk(data: &[u8]) -> Vec<u8> {
    let mut out = format!("{:x}\r\n", data.len()).into_bytes();
    out.extend_from_slice(data);
    out.extend_from_slice(b"\r\n");
    if data.is_empty() {
        return b"0\r\n\r\n".to_vec();
    }
    out
}

/// A response head; without a length the body is `transfer-encoding: chunked`.
pub(crate) fn head_with(
    status: u16,
    headers: &[(String, String)],
    content_length: Option<usize>,
    close: bool,
) -> Vec<u8> {
    let mut out = format!("HTTP/1.1 {} {}\r\n", status, reason(status));
    out.push_str(&format!(
        "date: {}\r\n",
        httpdate::fmt_http_date(std::time::SystemTime::now())
    ));
    for (k, v) in headers {
        out.push_str(k);
        out.push_str(": ");
        out.push_str(v);
        out.push_str("\r\n");
    }
    match content_length {
        Some(n) => out.push_str(&format!("content-length: {n}\r\n")),
        None => out.push_str("transfer-encoding: chunked\r\n"),
    }
    out.push_str(if close {
        "connection: close\r\n"
    } else {
        "connection: keep-alive\r\n"
    });
    out.push_str("\r\n");
    out.into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunked_decoding() {
        let raw = b"5\r\nhello\r\n6;ext=1\r\n world\r\n0\r\nx-trailer: 1\r\n\r\nNEXT";
        let (body, used) = decode_chunked(raw).unwrap().unwrap();
        assert_eq!(body, b"hello world");
        assert_eq!(&raw[used..], b"NEXT");
        assert!(decode_chunked(b"5\r\nhel").unwrap().is_none());
        assert!(decode_chunked(b"5\r\nhello\r\n0\r\n").unwrap().is_none());
        assert!(decode_chunked(b"zz\r\n").is_err());
    }
}
