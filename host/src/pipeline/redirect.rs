//! Redirects: the next hop a 3xx asks for, with the method, body and headers a browser would carry over.
//! Pure: no I/O, no policy (every hop is decided afresh by the caller).

use http::{HeaderName, Method, StatusCode};

use super::request::Prepared;
use super::target::Target;

/// Why a redirect cannot be followed.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum RedirectError {
    #[error("redirect Location refused: {0}")]
    Location(String),
}

/// The next hop of a redirect, with the method, body and headers a browser would carry over.
pub fn next_hop(
    current: &Prepared,
    status: StatusCode,
    location: &str,
    is_secret_header: impl Fn(&str) -> bool,
) -> Result<Prepared, RedirectError> {
    let target = Target::resolve_against(Some(&current.target.url), location)
        .map_err(|err| RedirectError::Location(err.to_string()))?;
    let becomes_get = status == StatusCode::SEE_OTHER && current.method != Method::HEAD
        || matches!(status, StatusCode::MOVED_PERMANENTLY | StatusCode::FOUND)
            && current.method == Method::POST;
    let cross_origin = target.url.origin() != current.target.url.origin();
    let mut headers = current.headers.clone();
    if becomes_get {
        headers.retain(|(name, _)| !is_content_header(name));
    }
    if cross_origin {
        // Credentials and cookies belong to the origin they were meant for.
        headers.retain(|(name, _)| {
            name != http::header::AUTHORIZATION
                && name != http::header::COOKIE
                && !is_secret_header(name.as_str())
        });
    }
    Ok(Prepared {
        method: if becomes_get {
            Method::GET
        } else {
            current.method.clone()
        },
        target,
        headers,
        content_length: if becomes_get {
            None
        } else {
            current.content_length
        },
        redirect: current.redirect,
        timeout_ms: current.timeout_ms,
        // Still named on every hop, so the policy sees them; the broker withholds them off-origin.
        secrets: current.secrets.clone(),
        upgrade: None,
    })
}

fn is_content_header(name: &HeaderName) -> bool {
    name == http::header::CONTENT_TYPE
        || name == http::header::CONTENT_ENCODING
        || name == http::header::CONTENT_LANGUAGE
        || name == http::header::CONTENT_LOCATION
}

#[cfg(test)]
mod tests {
    use http::{HeaderName, HeaderValue, Method, StatusCode};
    use pexi_protocol::payload::RedirectMode;

    use super::*;

    fn request(method: Method, url: &str, headers: &[(&str, &str)]) -> Prepared {
        Prepared {
            method,
            target: Target::parse(url).expect("url"),
            headers: headers
                .iter()
                .map(|(n, v)| {
                    (
                        HeaderName::from_bytes(n.as_bytes()).expect("name"),
                        HeaderValue::from_str(v).expect("value"),
                    )
                })
                .collect(),
            content_length: Some(3),
            redirect: RedirectMode::Follow,
            timeout_ms: None,
            secrets: vec!["api".into()],
            upgrade: None,
        }
    }

    fn names(prepared: &Prepared) -> Vec<&str> {
        prepared.headers.iter().map(|(n, _)| n.as_str()).collect()
    }

    #[test]
    fn see_other_becomes_a_get_without_body_or_content_headers() {
        let post = request(
            Method::POST,
            "https://a.example/form",
            &[("content-type", "text/plain"), ("accept", "*/*")],
        );
        let next = next_hop(&post, StatusCode::SEE_OTHER, "/done", |_| false).expect("hop");
        assert_eq!(next.method, Method::GET);
        assert_eq!(next.content_length, None);
        assert_eq!(names(&next), ["accept"]);
        assert_eq!(next.target.url.as_str(), "https://a.example/done");
        assert_eq!(
            next.secrets,
            ["api"],
            "still named, so the policy sees them"
        );
    }

    #[test]
    fn temporary_and_permanent_redirects_keep_method_and_body() {
        for status in [
            StatusCode::TEMPORARY_REDIRECT,
            StatusCode::PERMANENT_REDIRECT,
        ] {
            let put = request(
                Method::PUT,
                "https://a.example/x",
                &[("content-type", "a/b")],
            );
            let next = next_hop(&put, status, "https://a.example/y", |_| false).expect("hop");
            assert_eq!(next.method, Method::PUT);
            assert_eq!(next.content_length, Some(3));
            assert_eq!(names(&next), ["content-type"]);
        }
        // 301 and 302 turn only POST into GET, as browsers do.
        let post = request(Method::POST, "https://a.example/x", &[]);
        let next = next_hop(&post, StatusCode::FOUND, "/y", |_| false).expect("hop");
        assert_eq!(next.method, Method::GET);
        let delete = request(Method::DELETE, "https://a.example/x", &[]);
        let next = next_hop(&delete, StatusCode::FOUND, "/y", |_| false).expect("hop");
        assert_eq!(next.method, Method::DELETE);
    }

    #[test]
    fn credentials_stay_with_their_origin() {
        let get = request(
            Method::GET,
            "https://a.example/",
            &[
                ("authorization", "Bearer x"),
                ("cookie", "s=1"),
                ("x-api-key", "k"),
                ("accept", "*/*"),
            ],
        );
        let same = next_hop(&get, StatusCode::FOUND, "/next", |n| n == "x-api-key").expect("hop");
        assert_eq!(
            names(&same),
            ["authorization", "cookie", "x-api-key", "accept"]
        );
        let other = next_hop(&get, StatusCode::FOUND, "https://b.example/", |n| {
            n == "x-api-key"
        })
        .expect("hop");
        assert_eq!(names(&other), ["accept"]);
        // Another port or scheme is another origin too.
        let port = next_hop(&get, StatusCode::FOUND, "https://a.example:8443/", |_| {
            false
        })
        .expect("hop");
        assert_eq!(names(&port), ["x-api-key", "accept"]);
    }

    #[test]
    fn a_location_that_is_not_a_url_we_accept_is_refused() {
        let get = request(Method::GET, "https://a.example/", &[]);
        let refused = next_hop(&get, StatusCode::FOUND, "ftp://a.example/", |_| false);
        assert!(
            matches!(refused, Err(RedirectError::Location(_))),
            "{refused:?}"
        );
        let error = crate::pipeline::failure::RequestError::from(refused.expect_err("refused"));
        assert_eq!(
            error.code(),
            pexi_protocol::payload::ErrorCode::InvalidRequest
        );
    }
}
