import { describe, expect, it } from 'vitest';
import {
  debFilePrefix, FLAVOR_SPECS, parseAptPolicy, parseDependsClosure, parseHostAptSource, renderPrivateSources,
} from '../../src/node-stack/provision.js';

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
