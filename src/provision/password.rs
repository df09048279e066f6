//! Password hashing for users whose password comes from a file: SHA-512 crypt, as `mkpasswd -m
//! sha-512` and glibc's crypt(3) produce, so the plain text never reaches an image.

use sha_crypt::{PasswordHasher, ShaCrypt};

/// `$6$rounds=5000$<salt>$<hash>` for `password`, with a salt derived per node and user so that
/// rebuilding gives the same bytes.
pub fn sha512_crypt(password: &str, salt: &[u8; 12]) -> String {
    ShaCrypt::SHA512
        .hash_password_with_salt(password.as_bytes(), salt)
        .expect("SHA-512 crypt accepts any password and a 12-byte salt")
        .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_has_the_crypt_shape() {
        let h = sha512_crypt("correct horse", &[7u8; 12]);
        assert!(h.starts_with("$6$rounds=5000$"), "{h}");
        assert_eq!(h, sha512_crypt("correct horse", &[7u8; 12]));
        assert_ne!(h, sha512_crypt("correct horse", &[8u8; 12]));
    }
}
