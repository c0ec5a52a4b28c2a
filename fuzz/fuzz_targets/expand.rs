//! Shell-word expansion must return errors, never panic.
#![no_main]

use kiln_dockerfile::shell::Lex;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(s) = std::str::from_utf8(data) {
        let env = vec![("A".to_string(), "x y".to_string()), ("E".to_string(), String::new())];
        for escape in ['\\', '`'] {
            let lex = Lex::new(escape);
            let _ = lex.process(s, &env);
            let _ = Lex { raw_quotes: true, raw_escapes: true, skip_unset_env: true, ..lex }.process(s, &env);
        }
    }
});
