//! The fake internet's web servers: plain HTTP that answers with what it saw (`Host`, path, the
//! client's address), the same over TLS answering with the SNI too, and a PEP 503 "simple"
//! package index serving one wheel. Just enough HTTP/1.x for curl, wget, pip and hearth's proxy:
//! one request per connection, `Connection: close`.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

/// Largest request head read (bytes).
const MAX_HEAD: usize = 16 * 1024;

/// What a web server serves.
#[derive(Clone)]
pub enum Site {
    /// Answers every request with `host=H path=P from=IP` (and `sni=S` over TLS).
    Echo,
    /// A PEP 503 simple index at `/simple/` with one package.
    Index(Arc<Package>),
}

/// The one package the index serves.
pub struct Package {
    /// Project name (`hearth-fake-pkg`), normalized as PEP 503 wants it in URLs.
    pub project: String,
    /// The wheel's file name.
    pub file_name: String,
    pub wheel: Vec<u8>,
    /// Hex SHA-256 of the wheel (pip checks the `#sha256=` fragment).
    pub sha256: String,
}

/// Serves plain HTTP on `listener` for ever.
pub async fn serve_http(listener: TcpListener, site: Site) {
    loop {
        let Ok((stream, peer)) = listener.accept().await else {
            continue;
        };
        let site = site.clone();
        tokio::spawn(async move {
            let _ = handle(stream, peer, None, &site).await;
        });
    }
}

/// Serves HTTPS on `listener` for ever; answers carry the SNI the client sent.
pub async fn serve_https(listener: TcpListener, acceptor: TlsAcceptor) {
    loop {
        let Ok((stream, peer)) = listener.accept().await else {
            continue;
        };
        let acceptor = acceptor.clone();
        tokio::spawn(async move {
            let Ok(tls) = acceptor.accept(stream).await else {
                return;
            };
            let sni = tls.get_ref().1.server_name().unwrap_or("-").to_string();
            let _ = handle(tls, peer, Some(sni), &Site::Echo).await;
        });
    }
}

async fn handle<S: AsyncRead + AsyncWrite + Unpin>(
    mut stream: S,
    peer: SocketAddr,
    sni: Option<String>,
    site: &Site,
) -> std::io::Result<()> {
    let Some(head) = read_head(&mut stream).await? else {
        return Ok(());
    };
    let (path, host) = parse_head(&head);
    let (status, content_type, body) = match site {
        Site::Echo => {
            let mut text = format!("host={host} path={path} from={}", peer.ip());
            if let Some(sni) = sni {
                text.push_str(&format!(" sni={sni}"));
            }
            text.push('\n');
            ("200 OK", "text/plain", text.into_bytes())
        }
        Site::Index(package) => index(package, &path),
    };
    let header = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(header.as_bytes()).await?;
    stream.write_all(&body).await?;
    stream.shutdown().await
}

/// The PEP 503 pages and the wheel itself.
fn index(package: &Package, path: &str) -> (&'static str, &'static str, Vec<u8>) {
    let project = &package.project;
    let html = |body: String| {
        let page = format!("<!DOCTYPE html>\n<html><body>\n{body}</body></html>\n");
        ("200 OK", "text/html", page.into_bytes())
    };
    match path.split('?').next().unwrap_or("") {
        "/simple/" | "/simple" => html(format!("<a href=\"/simple/{project}/\">{project}</a>\n")),
        p if p.trim_end_matches('/') == format!("/simple/{project}") => html(format!(
            "<a href=\"/packages/{file}#sha256={sha}\">{file}</a>\n",
            file = package.file_name,
            sha = package.sha256
        )),
        p if p == format!("/packages/{}", package.file_name) => {
            ("200 OK", "application/octet-stream", package.wheel.clone())
        }
        _ => ("404 Not Found", "text/plain", b"not found\n".to_vec()),
    }
}

/// Bytes up to the end of the request head; `None` if the client sent no complete head.
async fn read_head<S: AsyncRead + Unpin>(stream: &mut S) -> std::io::Result<Option<String>> {
    let mut head = Vec::new();
    let mut buf = [0u8; 4096];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        if head.len() > MAX_HEAD {
            return Ok(None);
        }
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            return Ok(None);
        }
        head.extend_from_slice(&buf[..n]);
    }
    Ok(Some(String::from_utf8_lossy(&head).into_owned()))
}

/// (path, Host header) of a request head; `-` for what is missing.
fn parse_head(head: &str) -> (String, String) {
    let mut lines = head.lines();
    let path = lines
        .next()
        .and_then(|line| line.split_whitespace().nth(1))
        .unwrap_or("-")
        .to_string();
    let host = lines
        .filter_map(|line| line.split_once(':'))
        .find(|(name, _)| name.trim().eq_ignore_ascii_case("host"))
        .map(|(_, value)| value.trim().to_string())
        .unwrap_or_else(|| "-".into());
    (path, host)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_path_and_host_from_a_request_head() {
        let head = "GET /a/b?c HTTP/1.1\r\nUser-Agent: x\r\nhOsT:  allowed.example:80 \r\n\r\n";
        assert_eq!(
            parse_head(head),
            ("/a/b?c".to_string(), "allowed.example:80".to_string())
        );
        assert_eq!(parse_head("junk"), ("-".to_string(), "-".to_string()));
    }

    #[test]
    fn the_index_links_the_wheel_with_its_hash() {
        let package = Package {
            project: "demo".into(),
            file_name: "demo-1.0-py3-none-any.whl".into(),
            wheel: b"zip".to_vec(),
            sha256: "ab".into(),
        };
        let (_, _, page) = index(&package, "/simple/demo/");
        let page = String::from_utf8(page).unwrap();
        assert!(page.contains("href=\"/packages/demo-1.0-py3-none-any.whl#sha256=ab\""));
        let (status, _, wheel) = index(&package, "/packages/demo-1.0-py3-none-any.whl");
        assert_eq!((status, wheel.as_slice()), ("200 OK", &b"zip"[..]));
        assert_eq!(index(&package, "/other").0, "404 Not Found");
    }
}
