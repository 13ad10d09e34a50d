import { describe, expect, it } from 'vitest';
import {
  chooseVersions, debFilePrefix, parseAptPolicy, parseDependsClosure, parseHostAptSource, renderPrivateSources,
} from '../../src/node-stack/apt.js';
import { isThawError } from '../../src/errors.js';
import { PEER_TOOLS_SPEC } from '../../src/node-stack/peer-tools.js';
import { FLAVOR_SPECS } from '../../src/node-stack/provision.js';
import { REGISTRY_SPEC } from '../../src/node-stack/registry-provision.js';

const DEB822 = `Types: deb
# http://snapshot.debian.org/archive/debian/20250520T000000Z
URIs: http://deb.debian.org/debian
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: http://deb.debian.org/debian-security
Suites: bookworm-security
Components: main
`;

describe('host apt sources', () => {
  it('takes the main archive URI and keyring of a deb822 file, not the security one', () => {
    expect(parseHostAptSource('/etc/apt/sources.list.d/debian.sources', DEB822)).toMatchObject({
      uri: 'http://deb.debian.org/debian', signedBy: '/usr/share/keyrings/debian-archive-keyring.gpg',
    });
    const securityFirst = DEB822.split('\n\n').reverse().join('\n\n');
    expect(parseHostAptSource('x.sources', securityFirst)?.uri).toBe('http://deb.debian.org/debian');
  });

  it('reads one-line sources.list entries, with options', () => {
    const list = '# comment\ndeb http://security.debian.org/debian-security bookworm-security main\n'
      + 'deb [arch=amd64 signed-by=/k.gpg] http://mirror.example/debian bookworm main\n';
    expect(parseHostAptSource('/etc/apt/sources.list', list)).toMatchObject({ uri: 'http://mirror.example/debian', signedBy: '/k.gpg' });
    expect(parseHostAptSource('/etc/apt/sources.list', '# nothing\n')).toBeUndefined();
  });

  it('renders a private deb822 source with the machine\'s URI and our suite', () => {
    expect(renderPrivateSources({ uri: 'http://m/debian', signedBy: '/k.gpg' }, 'trixie')).toBe(
      'Types: deb\nURIs: http://m/debian\nSuites: trixie\nComponents: main\nSigned-By: /k.gpg\n');
    expect(renderPrivateSources({ uri: 'http://m/debian' }, 'sid')).not.toContain('Signed-By');
  });
});

describe('apt-cache output', () => {
  it('parses policy: candidate and every version of the table', () => {
    const text = `containerd:
  Installed: (none)
  Candidate: 1.7.24~ds1-6+deb13u1
  Version table:
     1.7.24~ds1-6+deb13u1 500
        500 http://deb.debian.org/debian trixie/main amd64 Packages
     1.7.24~ds1-6 500
        500 http://deb.debian.org/debian trixie/main amd64 Packages
busybox-static:
  Installed: 1:1.35.0-4+b3
  Candidate: 1:1.37.0-6+b9
  Version table:
 *** 1:1.35.0-4+b3 100
        100 /var/lib/dpkg/status
     1:1.37.0-6+b9 500
        500 http://deb.debian.org/debian trixie/main amd64 Packages
nothing:
  Installed: (none)
  Candidate: (none)
  Version table:
`;
    const p = parseAptPolicy(text);
    expect(p.get('containerd')).toEqual({ candidate: '1.7.24~ds1-6+deb13u1', versions: ['1.7.24~ds1-6+deb13u1', '1.7.24~ds1-6'] });
    expect(p.get('busybox-static')).toEqual({ candidate: '1:1.37.0-6+b9', versions: ['1:1.35.0-4+b3', '1:1.37.0-6+b9'] });
    expect(p.get('nothing')).toEqual({ versions: [] });
  });

  it('parses a recursive depends listing into real package names', () => {
    const text = 'criu\n  Depends: libc6\n  Depends: <debconf-2.0>\nlibc6\n  Depends: libgcc-s1\n<debconf-2.0>\n  cdebconf\ndebconf\nlibgcc-s1\nlibc6\n';
    expect(parseDependsClosure(text)).toEqual(['criu', 'libc6', 'libgcc-s1']);
  });

  it('names .deb files as apt-get download does (epoch colon escaped)', () => {
    expect(debFilePrefix('busybox-static', '1:1.37.0-6+b9')).toBe('busybox-static_1%3a1.37.0-6+b9_');
    expect(debFilePrefix('criu', '4.1.1-1')).toBe('criu_4.1.1-1_');
  });
});

describe('flavor pins', () => {
  it('pin every package a stack needs, from the right suite', () => {
    expect(FLAVOR_SPECS['1.7'].suite).toBe('trixie');
    expect(FLAVOR_SPECS['2.1'].suite).toBe('sid');
    expect(FLAVOR_SPECS['1.7'].pins.containerd).toMatch(/^1\.7\./);
    expect(FLAVOR_SPECS['2.1'].pins.containerd).toMatch(/^2\.1\./);
    for (const spec of Object.values(FLAVOR_SPECS)) {
      for (const name of ['containerd', 'runc', 'criu', 'tar', 'gzip', 'busybox-static', 'golang-github-kubernetes-cri-api-dev']) {
        expect(spec.pins[name], name).toBeDefined();
      }
    }
  });
});

describe('version choice', () => {
  const spec = { suite: 'sid', pins: { cosign: '3.1.1-2', oras: '1.3.3-1' } };
  const policy = parseAptPolicy(`cosign:
  Candidate: 3.1.1-2
  Version table:
     3.1.1-2 500
oras:
  Candidate: 1.3.4-1
  Version table:
     1.3.4-1 500
libc6:
  Candidate: 2.43-7
  Version table:
     2.43-7 500
`);

  it('takes a pin the suite still has, else the candidate with a warning; unpinned closure members silently', () => {
    const { chosen, warnings } = chooseVersions(['cosign', 'libc6', 'oras'], spec, policy);
    expect(chosen).toEqual({ cosign: '3.1.1-2', libc6: '2.43-7', oras: '1.3.4-1' });
    expect(warnings).toEqual(['oras 1.3.3-1 is gone from sid; using the candidate 1.3.4-1']);
  });

  it('fails naming the package the suite does not have', () => {
    let caught: unknown;
    try {
      chooseVersions(['cosign', 'kubectl'], spec, policy);
    } catch (e) {
      caught = e;
    }
    expect(isThawError(caught) && caught.code).toBe('STACK_PROVISION_FAILED');
    expect((caught as Error).message).toContain('kubectl');
  });
});

describe('component specs', () => {
  it('pin every package whose binary they check, and libc6 of the same suite (the binaries are patched onto it)', () => {
    for (const spec of [PEER_TOOLS_SPEC, REGISTRY_SPEC]) {
      expect(spec.pins.libc6, spec.component).toBeDefined();
      for (const [name, b] of Object.entries(spec.binaries)) {
        expect(b.file, name).toMatch(/^usr\/s?bin\//);
        expect(spec.pins[name], name).toBeDefined();
      }
    }
    expect(PEER_TOOLS_SPEC.suite).toBe('sid');
    expect(Object.keys(PEER_TOOLS_SPEC.binaries).sort()).toEqual(['cosign', 'kubectl', 'kustomize', 'notation', 'oras', 'skopeo']);
    expect(PEER_TOOLS_SPEC.pins.cosign).toMatch(/^3\.1\.1-/);
    expect(PEER_TOOLS_SPEC.pins.oras).toMatch(/^1\.3\.3-/);
    expect(PEER_TOOLS_SPEC.pins.kustomize).toMatch(/^5\.8\.1\+/);
    expect(PEER_TOOLS_SPEC.pins.kubectl).toMatch(/^1\.36\./);
  });
});
