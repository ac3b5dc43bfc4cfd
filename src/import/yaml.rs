//! A YAML document as a tree whose nodes know their line, so that every error about the
//! reference config names the line (yaml-rust2's own tree does not keep positions).

use yaml_rust2::parser::{Event, MarkedEventReceiver, Parser};
use yaml_rust2::scanner::{Marker, TScalarStyle};
use yaml_rust2::yaml::Yaml;

/// One node and the line (1-based) it starts on.
#[derive(Debug, Clone, PartialEq)]
pub struct Node {
    pub value: Value,
    pub line: usize,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    /// A scalar as written; `plain` when unquoted (then `true`, `8080`, `~` are not strings).
    Scalar {
        text: String,
        plain: bool,
    },
    Seq(Vec<Node>),
    /// Entries in file order.
    Map(Vec<(Node, Node)>),
    /// `*anchor`: the reference config has no use for them.
    Alias,
}

impl Node {
    /// The YAML tag of the node, as Go's yaml.v3 names it in its errors (`!!seq`, `!!map`,
    /// `!!str`, `!!int`, `!!bool`, `!!float`, `!!null`).
    pub fn tag(&self) -> &'static str {
        match &self.value {
            Value::Seq(_) => "!!seq",
            Value::Map(_) => "!!map",
            Value::Alias => "!!alias",
            Value::Scalar { plain: false, .. } => "!!str",
            Value::Scalar { text, plain: true } => match Yaml::from_str(text) {
                Yaml::Integer(_) => "!!int",
                Yaml::Real(_) => "!!float",
                Yaml::Boolean(_) => "!!bool",
                Yaml::Null => "!!null",
                _ => "!!str",
            },
        }
    }

    /// The scalar's text, for any scalar (yaml.v3 decodes `8080` into a string field too).
    pub fn scalar(&self) -> Option<&str> {
        match &self.value {
            Value::Scalar { text, .. } if self.tag() != "!!null" => Some(text),
            _ => None,
        }
    }

    /// `true`/`false` (YAML 1.2 core schema, as yaml.v3).
    pub fn boolean(&self) -> Option<bool> {
        match &self.value {
            Value::Scalar { text, plain: true } => match Yaml::from_str(text) {
                Yaml::Boolean(b) => Some(b),
                _ => None,
            },
            _ => None,
        }
    }
}

#[derive(Default)]
struct Builder {
    /// Open collections: the node being built and, for maps, a key waiting for its value.
    stack: Vec<(Node, Option<Node>)>,
    root: Option<Node>,
}

impl Builder {
    fn attach(&mut self, node: Node) {
        match self.stack.last_mut() {
            None => {
                if self.root.is_none() {
                    self.root = Some(node);
                }
            }
            Some((parent, pending)) => match &mut parent.value {
                Value::Seq(items) => items.push(node),
                Value::Map(entries) => match pending.take() {
                    None => *pending = Some(node),
                    Some(key) => entries.push((key, node)),
                },
                _ => {}
            },
        }
    }
}

impl MarkedEventReceiver for Builder {
    fn on_event(&mut self, ev: Event, mark: Marker) {
        let line = mark.line();
        match ev {
            Event::Scalar(text, style, _, _) => self.attach(Node {
                value: Value::Scalar {
                    text,
                    plain: style == TScalarStyle::Plain,
                },
                line,
            }),
            Event::Alias(_) => self.attach(Node {
                value: Value::Alias,
                line,
            }),
            Event::SequenceStart(..) => self.stack.push((
                Node {
                    value: Value::Seq(Vec::new()),
                    line,
                },
                None,
            )),
            Event::MappingStart(..) => self.stack.push((
                Node {
                    value: Value::Map(Vec::new()),
                    line,
                },
                None,
            )),
            Event::SequenceEnd | Event::MappingEnd => {
                if let Some((node, _)) = self.stack.pop() {
                    self.attach(node);
                }
            }
            _ => {}
        }
    }
}

/// Parses the first document; `Ok(None)` for an empty file. The error is yaml-rust2's
/// message with its line and column.
pub fn parse(text: &str) -> Result<Option<Node>, String> {
    let mut b = Builder::default();
    Parser::new_from_str(text)
        .load(&mut b, false)
        .map_err(|e| e.to_string())?;
    Ok(b.root)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tree_with_lines_and_tags() {
        let text =
            "listen_addr: \":8080\"\nroutes:\n  - echo\n  - wiki\nport: 8080\nflag: true\nempty:\n";
        let root = parse(text).unwrap().unwrap();
        let Value::Map(entries) = &root.value else {
            panic!("{root:?}")
        };
        let get = |k: &str| {
            &entries
                .iter()
                .find(|(key, _)| key.scalar() == Some(k))
                .unwrap()
                .1
        };
        assert_eq!(get("listen_addr").scalar(), Some(":8080"));
        assert_eq!(get("listen_addr").tag(), "!!str");
        assert_eq!((get("routes").tag(), get("routes").line), ("!!seq", 3));
        assert_eq!(get("port").tag(), "!!int");
        assert_eq!(get("flag").boolean(), Some(true));
        assert_eq!(get("empty").tag(), "!!null");
        assert_eq!(get("empty").scalar(), None);
    }

    #[test]
    fn syntax_errors_name_the_position() {
        let e = parse("routes:\n  echo: [unclosed\n").unwrap_err();
        assert!(e.contains("line"), "{e}");
    }
}
