//! What a password must be to be set (`storage.password_policy`): long enough, and
//! not one an attacker tries first. Checked wherever one is set (`AddUser`,
//! `SetPassword`, so `mailctl user add` / `passwd` and `mailctl dev`), with a reason
//! the operator can act on.

use serde::Deserialize;

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PasswordPolicy {
    /// Fewest characters (Unicode scalar values) a password has.
    pub min_length: usize,
    /// Refuse the most common passwords, one character repeated, a straight run of
    /// letters or digits, and the address (or its local part) itself.
    pub refuse_common: bool,
}

impl Default for PasswordPolicy {
    fn default() -> Self {
        Self {
            min_length: 12,
            refuse_common: true,
        }
    }
}

/// The most common passwords of twelve characters or more in published breach
/// corpora (shorter ones fail the length rule already), lower case.
const COMMON: &[&str] = &[
    "123456789012",
    "1234567890123",
    "12345678901234",
    "123456789123",
    "123123123123",
    "123321123321",
    "111111111111",
    "000000000000",
    "1q2w3e4r5t6y",
    "1qaz2wsx3edc",
    "1qazxsw23edc",
    "zaq12wsxcde3",
    "qwertyuiop12",
    "qwertyuiop123",
    "qwerty123456",
    "qwertyqwerty",
    "qwe123qwe123",
    "asdfghjkl123",
    "asdfghjklzxc",
    "zxcvbnm12345",
    "abc123abc123",
    "abcd1234abcd",
    "password1234",
    "password12345",
    "password123456",
    "passwordpassword",
    "password1!password1!",
    "p@ssw0rd1234",
    "p@ssword1234",
    "administrator",
    "administrator1",
    "letmein12345",
    "welcome12345",
    "welcome123456",
    "changeme1234",
    "changeme12345",
    "iloveyou1234",
    "iloveyou12345",
    "football1234",
    "baseball1234",
    "superman1234",
    "princess1234",
    "sunshine1234",
    "trustno11234",
    "monkey123456",
    "dragon123456",
    "master123456",
    "shadow123456",
    "michael12345",
    "jennifer1234",
    "starwars1234",
    "whatever1234",
    "computer1234",
    "internet1234",
    "mailmesh1234",
    "correcthorsebatterystaple",
    "thequickbrownfox",
    "hello1234567",
    "helloworld123",
    "secret123456",
];

impl PasswordPolicy {
    /// Why `password` may not be `address`'s, if it may not.
    pub fn refuses(&self, address: &str, password: &str) -> Option<String> {
        let length = password.chars().count();
        if length < self.min_length {
            return Some(format!(
                "a password needs at least {} characters (this one has {length})",
                self.min_length
            ));
        }
        if !self.refuse_common {
            return None;
        }
        let lower = password.to_lowercase();
        let local = address
            .rsplit_once('@')
            .map_or(address, |(l, _)| l)
            .to_lowercase();
        if COMMON.contains(&lower.as_str()) {
            return Some("that password is one of the most common ones; choose another".into());
        }
        let chars: Vec<char> = lower.chars().collect();
        if chars.windows(2).all(|w| w[0] == w[1]) {
            return Some("a password of one character repeated is guessed at once".into());
        }
        let step = |w: &[char]| (w[1] as i64) - (w[0] as i64);
        if chars.windows(2).all(|w| step(w) == 1) || chars.windows(2).all(|w| step(w) == -1) {
            return Some("a straight run of letters or digits is guessed at once".into());
        }
        let trimmed =
            lower.trim_end_matches(|c: char| c.is_ascii_digit() || c.is_ascii_punctuation());
        if lower == address.to_lowercase() || (!local.is_empty() && trimmed == local) {
            return Some("a password may not be the address itself".into());
        }
        None
    }

    /// Every length and rule off (tests that log in with short passwords).
    pub fn relaxed() -> Self {
        Self {
            min_length: 1,
            refuse_common: false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_common_and_trivial_passwords_are_refused_with_a_reason() {
        let policy = PasswordPolicy::default();
        let refused = |p: &str| policy.refuses("alice@acme.test", p);
        assert!(
            refused("short-pw")
                .unwrap()
                .contains("at least 12 characters (this one has 8)")
        );
        assert!(refused("Password1234").unwrap().contains("most common"));
        assert!(refused("aaaaaaaaaaaaaa").unwrap().contains("one character"));
        assert!(refused("abcdefghijklm").unwrap().contains("straight run"));
        assert!(refused("9876543210987").is_none(), "0 after 9 is no run");
        assert!(refused("alice@acme.test").unwrap().contains("address"));
        assert!(refused("alicealice").unwrap().contains("at least"));
        assert!(
            refused("ALICE1234567!").unwrap().contains("address"),
            "the address and digits"
        );
        assert!(refused("alice-in-wonderland").is_none());
        assert_eq!(refused("correct-horse-battery"), None);
        // Characters, not bytes.
        assert!(refused("ééééééabcdé").is_some());
        assert_eq!(
            PasswordPolicy::relaxed().refuses("alice@acme.test", "pw"),
            None
        );
    }
}
