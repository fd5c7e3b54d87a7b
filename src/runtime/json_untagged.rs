//! Objects of a union that no tag tells apart (`Schema::Untagged`): Pydantic's `Union[A, B]`
//! of models and zod's `z.union` of objects, written as `anyOf` (or `oneOf`) of objects with no
//! property that each requires with values of its own (those are `json_tagged`). The object is
//! read as all the branches' properties at once, and each key written keeps only the branches
//! that have it (`live`): a key is let through only if some live branch has it, and the object
//! may close only when some live branch has all its required keys written, so it is always an
//! object of one of the branches.
//!
//! A property two branches share must have the same schema in both (otherwise which branch a
//! value belongs to would be known only after it). Under `oneOf` no object may be one of two
//! branches: each branch must require a key that no other branch has.

use crate::runtime::json_mode::{Property, Schema, MAX_PROPERTIES};
use std::sync::Arc;

/// Most branches a union of objects may have (`live` is a bit set).
pub const MAX_BRANCHES: usize = 64;

#[derive(Debug, Clone, PartialEq)]
pub struct Untagged {
    /// Every branch's properties, each name once (`Schema::Object`; `required` unused).
    pub props: Arc<Schema>,
    /// Per branch: bit i for each of `props`' properties it has.
    pub has: Vec<u64>,
    /// Per branch: bit i for each it requires.
    pub required: Vec<u64>,
}

impl Untagged {
    /// The union of `objects` (`Schema::Object`s); `one_of`: for `oneOf`. `Err`: why not.
    pub fn merge(objects: &[Arc<Schema>], one_of: bool) -> Result<Untagged, String> {
        if objects.len() > MAX_BRANCHES {
            return Err(format!("a union of more than {MAX_BRANCHES} objects"));
        }
        let mut props: Vec<Property> = Vec::new();
        let (mut has, mut required) = (Vec::new(), Vec::new());
        for o in objects {
            let Schema::Object(ps) = &**o else {
                return Err("a branch that is not an object".into());
            };
            let (mut h, mut r) = (0u64, 0u64);
            for p in ps {
                let i = match props.iter().position(|q| q.name == p.name) {
                    Some(i) if props[i].schema != p.schema => {
                        return Err(format!(
                            "a union of objects whose property `{}` differs between them \
                             (a union told apart by a shared property's value needs it to be a \
                             string `const` / `enum` each requires)",
                            String::from_utf8_lossy(&p.name)
                        ))
                    }
                    Some(i) => i,
                    None if props.len() == MAX_PROPERTIES => {
                        return Err(format!(
                            "a union of objects with more than {MAX_PROPERTIES} properties"
                        ))
                    }
                    None => {
                        props.push(Property {
                            required: false,
                            ..p.clone()
                        });
                        props.len() - 1
                    }
                };
                h |= 1 << i;
                if p.required {
                    r |= 1 << i;
                }
            }
            has.push(h);
            required.push(r);
        }
        let u = Untagged {
            props: Arc::new(Schema::Object(props)),
            has,
            required,
        };
        if one_of {
            u.exclusive()?;
        }
        Ok(u)
    }

    /// `oneOf`: no object written as one branch is also another's: every other branch
    /// requires a key the first does not have.
    fn exclusive(&self) -> Result<(), String> {
        for (a, &has) in self.has.iter().enumerate() {
            for (c, &req) in self.required.iter().enumerate() {
                if a != c && req & !has == 0 {
                    return Err(format!(
                        "a `oneOf` of objects where branch {a} can also be branch {c} (each \
                         branch must require a key the others do not have; `anyOf` has no such \
                         limit)"
                    ));
                }
            }
        }
        Ok(())
    }

    /// Every branch.
    pub fn all(&self) -> u64 {
        u64::MAX >> (64 - self.has.len())
    }

    /// The keys (bit i: `props[i]`) some branch of `live` has.
    pub fn keys(&self, live: u64) -> u64 {
        self.branches(live).fold(0, |m, b| m | self.has[b])
    }

    /// The branches of `live` that have key `i`.
    pub fn with_key(&self, live: u64, i: usize) -> u64 {
        self.branches(live)
            .filter(|&b| self.has[b] & (1 << i) != 0)
            .fold(0, |m, b| m | 1 << b)
    }

    /// Whether an object with keys `seen` is one of the branches of `live`.
    pub fn may_close(&self, live: u64, seen: u64) -> bool {
        self.branches(live).any(|b| self.required[b] & !seen == 0)
    }

    fn branches(&self, live: u64) -> impl Iterator<Item = usize> + '_ {
        (0..self.has.len()).filter(move |&b| live & (1 << b) != 0)
    }
}
