//! Password hashing for users whose password comes from a file: SHA-512 crypt, as `mkpasswd -m
//! sha-512` and glibc's crypt(3) produce, so the plain text never reaches an image.

use sha_crypt::{PasswordHasher, PasswordVerifier, ShaCrypt};

/// `$6$rounds=5000$<salt>$<hash>` for `password`, with a salt derived per node and user so that
/// rebuilding gives the same bytes.
pub fn sha512_crypt(password: &str, salt: &[u8; 12]) -> String {
    ShaCrypt::SHA512
        .hash_password_with_salt(password.as_bytes(), salt)
        .expect("SHA-512 crypt accepts any password and a 12-byte salt")
        .to_string()
}

/// Whether the crypt(3) `hash` is that of `password`; `None` for schemes kiln cannot check
/// (yescrypt, bcrypt), so callers can say so instead of guessing.
pub fn matches(password: &str, hash: &str) -> Option<bool> {
    let algo = if hash.starts_with("$6$") {
        ShaCrypt::SHA512
    } else if hash.starts_with("$5$") {
        ShaCrypt::SHA256
    } else {
        return None;
    };
    Some(algo.verify_password(password.as_bytes(), hash).is_ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_passwords_are_recognised() {
        let h = sha512_crypt("147147", &[1u8; 12]);
        assert_eq!(matches("147147", &h), Some(true));
        assert_eq!(matches("147148", &h), Some(false));
        // What `openssl passwd -6 -salt abcdefgh 147147` prints.
        let openssl = "$6$abcdefgh$pc3vS.vAkshZw4MJeaiP0sJ6M7QGYztVNUj52vNcaKmrgTSfKHoKgHATiQcLeiLhdKmwQnQpOWMyo0FARBCdq.";
        assert_eq!(matches("147147", openssl), Some(true));
        assert_eq!(matches("147147", "$y$j9T$abc$def"), None);
    }

    #[test]
    fn hash_has_the_crypt_shape() {
        let h = sha512_crypt("correct horse", &[7u8; 12]);
        assert!(h.starts_with("$6$rounds=5000$"), "{h}");
        assert_eq!(h, sha512_crypt("correct horse", &[7u8; 12]));
        assert_ne!(h, sha512_crypt("correct horse", &[8u8; 12]));
    }
}
