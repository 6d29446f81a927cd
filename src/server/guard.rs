//! Who may talk to the daemon, checked before any route runs: the token (when one is set), and without a
//! token the `Host` and `Origin` names (a web page on a DNS-rebinding domain resolves to 127.0.0.1 but still
//! says its own name in both). Refusals are answered with a status and a one-line reason, and counted.
use super::metrics::Route;
use super::{refusal, ServerState};
use crate::config::ServerConfig;
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::Next;
use axum::response::Response;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;

/// A WebSocket subprotocol carrying the token: `Sec-WebSocket-Protocol: sdstream.token.<TOKEN>` (echoed back).
pub const TOKEN_PROTOCOL_PREFIX: &str = "sdstream.token.";

/// The `Host` values served without a token: `localhost`, `127.0.0.1`, `[::1]` and the listen address, on the
/// daemon's port, plus `server.allowed_hosts` (`name` means on the daemon's port). Lower case.
pub fn allowed_hosts(config: &ServerConfig, local: SocketAddr) -> Vec<String> {
    let port = local.port();
    let mut names: Vec<String> =
        ["localhost", "127.0.0.1", "[::1]"].iter().map(|h| format!("{h}:{port}")).collect();
    names.push(local.to_string());
    for h in &config.allowed_hosts {
        let h = h.to_ascii_lowercase();
        names.push(if has_port(&h) { h } else { format!("{h}:{port}") });
    }
    if port == 80 {
        // Browsers leave the default port out.
        let bare: Vec<String> =
            names.iter().filter_map(|n| n.strip_suffix(":80").map(str::to_string)).collect();
        names.extend(bare);
    }
    names.sort();
    names.dedup();
    names
}

/// Whether `authority` (`name:port`, `[v6]:port`, `name`) names a port.
fn has_port(authority: &str) -> bool {
    match authority.rsplit_once(':') {
        Some((host, port)) => {
            !port.is_empty()
                && port.bytes().all(|b| b.is_ascii_digit())
                && (!host.contains(':') || host.ends_with(']'))
        }
        None => false,
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The tokens a request presents: `?token=`, `Authorization: Bearer`, `Sec-WebSocket-Protocol` entries.
fn presented_tokens(query: Option<&str>, headers: &HeaderMap) -> Vec<String> {
    let mut tokens: Vec<String> = query
        .map(|q| {
            form_urlencoded::parse(q.as_bytes())
                .filter(|(k, _)| k == "token")
                .map(|(_, v)| v.into_owned())
                .collect()
        })
        .unwrap_or_default();
    for v in headers.get_all(header::AUTHORIZATION) {
        if let Some(t) = v.to_str().ok().and_then(|v| v.strip_prefix("Bearer ")) {
            tokens.push(t.trim().to_string());
        }
    }
    for v in headers.get_all(header::SEC_WEBSOCKET_PROTOCOL) {
        let Ok(v) = v.to_str() else { continue };
        tokens.extend(
            v.split(',').filter_map(|p| p.trim().strip_prefix(TOKEN_PROTOCOL_PREFIX)).map(str::to_string),
        );
    }
    tokens
}

/// The probes of load balancers and orchestrators, answered without the token: they say only whether the
/// daemon is live or takes one more stream, and a kubelet or HAProxy check cannot always carry a secret.
pub const TOKENLESS_PATHS: [&str; 2] = ["/health/live", "/health/ready"];

/// Why a request is refused, if it is.
pub fn refuse(
    state: &ServerState,
    path: &str,
    query: Option<&str>,
    headers: &HeaderMap,
) -> Option<(StatusCode, String)> {
    let header_str = |name| headers.get(name).map(|v| v.to_str().unwrap_or("\u{fffd}").to_ascii_lowercase());
    let host = header_str(header::HOST);
    let token = state.config.token.as_deref().filter(|t| !t.is_empty());
    if let Some(token) = token {
        let tokens = presented_tokens(query, headers);
        let probe = TOKENLESS_PATHS.contains(&path);
        if !probe && !tokens.iter().any(|t| constant_time_eq(t.as_bytes(), token.as_bytes())) {
            return Some((StatusCode::UNAUTHORIZED, "missing or wrong token".into()));
        }
    } else {
        match &host {
            None => return Some((StatusCode::FORBIDDEN, "a Host header is required".into())),
            Some(h) if !state.allowed_hosts.contains(h) => {
                return Some((
                    StatusCode::FORBIDDEN,
                    format!(
                        "host `{h}` is not served (DNS rebinding protection): use {}, add it to \
                         server.allowed_hosts, or set a token",
                        state.allowed_hosts.join(", ")
                    ),
                ));
            }
            Some(_) => {}
        }
    }
    // Browsers send Origin: it must be this server (its Host, or an allowed name) or a configured origin.
    if let Some(origin) = headers.get(header::ORIGIN) {
        let origin = origin.to_str().unwrap_or("\u{fffd}");
        let authority = origin
            .strip_prefix("http://")
            .or_else(|| origin.strip_prefix("https://"))
            .map(str::to_ascii_lowercase);
        let allowed = state.config.allowed_origins.iter().any(|o| o == origin)
            || authority
                .is_some_and(|a| host.as_deref() == Some(a.as_str()) || state.allowed_hosts.contains(&a));
        if !allowed {
            return Some((StatusCode::FORBIDDEN, format!("origin `{origin}` not allowed")));
        }
    }
    None
}

/// The middleware in front of every route.
pub async fn check(State(state): State<Arc<ServerState>>, req: Request, next: Next) -> Response {
    let route = Route::of(req.uri().path());
    if let Some((status, reason)) = refuse(&state, req.uri().path(), req.uri().query(), req.headers()) {
        state.metrics.refused_total.fetch_add(1, Ordering::Relaxed);
        state.metrics.route(route).refused.fetch_add(1, Ordering::Relaxed);
        tracing::debug!("refused {} {}: {reason}", req.method(), req.uri().path());
        return one_request(refusal(status, reason));
    }
    let counted = !route.is_stream();
    let _open = counted.then(|| super::metrics::RouteGuard::new(state.metrics.route(route)));
    let response = next.run(req).await;
    if response.status() == StatusCode::REQUEST_TIMEOUT {
        state.metrics.route(route).timeouts.fetch_add(1, Ordering::Relaxed);
    }
    one_request(response)
}

/// One request per connection: anything but an upgrade closes the connection after its response (so an idle
/// keep-alive connection cannot hold a slot).
fn one_request(mut response: Response) -> Response {
    if response.status() != StatusCode::SWITCHING_PROTOCOLS {
        response.headers_mut().insert(header::CONNECTION, axum::http::HeaderValue::from_static("close"));
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_and_ports() {
        let config = ServerConfig {
            allowed_hosts: vec!["Box.lan".into(), "other:9".into(), "[fe80::1]".into()],
            ..ServerConfig::default()
        };
        let h = allowed_hosts(&config, "127.0.0.1:8765".parse().unwrap());
        for ok in
            ["localhost:8765", "127.0.0.1:8765", "[::1]:8765", "box.lan:8765", "other:9", "[fe80::1]:8765"]
        {
            assert!(h.contains(&ok.to_string()), "{ok} in {h:?}");
        }
        assert!(!h.contains(&"localhost".to_string()));
        assert!(!h.contains(&"evil.example:8765".to_string()));
        assert!(has_port("a:1") && has_port("[::1]:2") && !has_port("[::1]") && !has_port("a"));
    }

    #[test]
    fn tokens_come_from_query_header_and_subprotocol() {
        let mut headers = HeaderMap::new();
        headers.insert(header::AUTHORIZATION, "Bearer b".parse().unwrap());
        headers.insert(header::SEC_WEBSOCKET_PROTOCOL, "x, sdstream.token.c%".parse().unwrap());
        let t = presented_tokens(Some("token=a%20b+c&x=1"), &headers);
        assert_eq!(t, ["a b c", "b", "c%"]);
    }
}
