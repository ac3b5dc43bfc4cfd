//! The Compose project's `.env`: `NAME=value` lines as Docker Compose reads them (`#`
//! comments, blank lines, an optional `export `, values optionally in single or double quotes,
//! ` #` starting a comment after an unquoted value).

/// `NAME`, value.
pub type Vars = Vec<(String, String)>;

/// A bad line: its number (1-based) and what is wrong with it.
pub type BadLine = (usize, String);

/// The variables in file order (a later definition replaces an earlier one), or every bad
/// line.
pub fn parse(text: &str) -> Result<Vars, Vec<BadLine>> {
    let mut vars: Vars = Vec::new();
    let mut problems = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let line = line.strip_prefix("export ").unwrap_or(line).trim_start();
        let Some((name, value)) = line.split_once('=') else {
            problems.push((i + 1, "expected NAME=value".to_string()));
            continue;
        };
        let name = name.trim();
        let valid = name
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
            && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
        if !valid {
            problems.push((i + 1, format!("{name:?} is not a variable name")));
            continue;
        }
        let value = value.trim();
        let value = match value.chars().next() {
            Some(q @ ('"' | '\'')) => match value[1..].find(q) {
                Some(end) => value[1..1 + end].to_string(),
                None => {
                    problems.push((i + 1, format!("{name}: unclosed {q} quote")));
                    continue;
                }
            },
            _ => match value.find(" #") {
                Some(c) => value[..c].trim_end().to_string(),
                None => value.to_string(),
            },
        };
        vars.retain(|(n, _)| n != name);
        vars.push((name.to_string(), value));
    }
    if problems.is_empty() {
        Ok(vars)
    } else {
        Err(problems)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compose_env_files() {
        let vars = parse(
            "# tunnel\nTUNNEL_DOMAIN=abcd1234.tunnel.anthropic.com\nexport TUNNEL_TOKEN='eyJh=='\n\nQUOTED=\"a # b\"\nPLAIN=x # comment\nEMPTY=\nPLAIN=y\n",
        )
        .unwrap();
        assert_eq!(
            vars,
            [
                ("TUNNEL_DOMAIN", "abcd1234.tunnel.anthropic.com"),
                ("TUNNEL_TOKEN", "eyJh=="),
                ("QUOTED", "a # b"),
                ("EMPTY", ""),
                ("PLAIN", "y"),
            ]
            .map(|(a, b)| (a.to_string(), b.to_string()))
        );
        let bad = parse("OK=1\nnot a line\n1X=2\nQ=\"open\n").unwrap_err();
        assert_eq!(
            bad.iter().map(|(l, _)| *l).collect::<Vec<_>>(),
            [2, 3, 4],
            "{bad:?}"
        );
    }
}
