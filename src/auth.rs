//! Client authentication (spec §7): `Authorization: Bearer <token>` against the proxy tokens,
//! compared in constant time so response timing does not reveal how much of a token matched.

use subtle::ConstantTimeEq;

/// The bearer token of an `Authorization` header value, if it is one.
pub fn bearer_token(header: Option<&str>) -> Option<&str> {
    let value = header?.trim();
    let (scheme, token) = value.split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

/// True if `presented` equals one of `tokens`. Every token is compared, so the time taken does
/// not depend on which one matched.
pub fn token_matches(presented: &str, tokens: &[String]) -> bool {
    tokens
        .iter()
        .fold(subtle::Choice::from(0), |acc, t| {
            acc | presented.as_bytes().ct_eq(t.as_bytes())
        })
        .into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_bearer_headers() {
        assert_eq!(bearer_token(Some("Bearer abc")), Some("abc"));
        assert_eq!(bearer_token(Some("bearer   abc ")), Some("abc"));
        assert_eq!(bearer_token(Some("Basic abc")), None);
        assert_eq!(bearer_token(Some("Bearer ")), None);
        assert_eq!(bearer_token(Some("Bearer")), None);
        assert_eq!(bearer_token(None), None);
    }

    #[test]
    fn matches_only_exact_tokens() {
        let tokens = vec!["alpha-token".to_owned(), "beta-token".to_owned()];
        assert!(token_matches("alpha-token", &tokens));
        assert!(token_matches("beta-token", &tokens));
        assert!(!token_matches("alpha-toke", &tokens));
        assert!(!token_matches("alpha-token2", &tokens));
        assert!(!token_matches("", &tokens));
        assert!(!token_matches("alpha-token", &[]));
    }
}
